"""Static pages from pages_dir: index files, redirects, types, and containment."""
import os

import pytest

from conftest import raw_exchange, request, status_of


@pytest.fixture
def site(tmp_path, start_server):
    pages = tmp_path / "pages"
    (pages / "docs").mkdir(parents=True)
    (pages / ".well-known" / "acme-challenge").mkdir(parents=True)
    (pages / "index.html").write_text("<h1>home</h1>")
    (pages / "docs" / "index.html").write_text("<h1>docs</h1>")
    (pages / "style.css").write_text("body{}")
    (pages / "big.bin").write_bytes(os.urandom(600 * 1024))
    (pages / ".env").write_text("SECRET=1")
    (pages / ".well-known" / "acme-challenge" / "token").write_text("proof")
    (tmp_path / "outside.txt").write_text("private")
    os.symlink(tmp_path / "outside.txt", pages / "link.txt")
    (pages / "404.html").write_text("<h1>custom 404</h1>")
    server = start_server(pages_dir=pages)
    server.pages = pages
    return server


def test_index_and_types(site):
    status, headers, body = request(site, "GET", "/")
    assert (status, body) == (200, b"<h1>home</h1>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert request(site, "GET", "/style.css")[1]["content-type"] == "text/css; charset=utf-8"
    assert request(site, "GET", "/docs/")[2] == b"<h1>docs</h1>"


def test_directory_without_slash_redirects(site):
    status, headers, _ = request(site, "GET", "/docs?x=1")
    assert status == 301 and headers["location"] == "/docs/?x=1"


def test_large_file_is_sent_whole(site):
    status, headers, body = request(site, "GET", "/big.bin")
    assert status == 200 and body == (site.pages / "big.bin").read_bytes()
    assert headers["content-length"] == str(600 * 1024)
    status, headers, body = request(site, "HEAD", "/big.bin")
    assert (status, body, headers["content-length"]) == (200, b"", str(600 * 1024))


@pytest.mark.parametrize("path", ["/.env", "/link.txt", "/docs/%2e%2e/%2e%2e/outside.txt",
                                  "/..%2foutside.txt", "/%2e%2e%5coutside.txt"])
def test_nothing_outside_pages_and_no_dotfiles(site, path):
    raw = raw_exchange(site, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       % path.encode())
    assert status_of(raw) in (400, 404), raw
    assert b"private" not in raw and b"SECRET" not in raw


def test_well_known_is_served(site):
    assert request(site, "GET", "/.well-known/acme-challenge/token")[2] == b"proof"


def test_custom_404_page_for_browsers(site):
    status, _, body = request(site, "GET", "/nope", headers={"Accept": "text/html"})
    assert (status, body) == (404, b"<h1>custom 404</h1>")
