"""Settings without a server: load_config's kinds, minimums, messages and per-route sections,
paths resolved against the config file, and the allowed_hosts rule (parse_allowed_hosts,
host_allowed). Each config is a small setup.cfg in tmp_path."""
import os

import pytest

from onebox.settings import (DEFAULT_CONFIG_FILE, ROOT, SETTINGS, ConfigError, host_allowed,
                             load_config, parse_allowed_hosts)


def write_config(tmp_path, text, name="setup.cfg"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def loaded(tmp_path, section, key, raw):
    """The parsed value of ``key = raw`` in ``[section]``, or the ConfigError's message."""
    path = write_config(tmp_path, "[%s]\n%s = %s\n" % (section, key, raw))
    try:
        config = load_config(path)
    except ConfigError as error:
        return "error: " + str(error)
    return getattr(getattr(config, section), key)


def short_id(value):
    return repr(value) if len(repr(value)) <= 50 else repr(value)[:40] + "..."


# --- kinds --------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, raw, expected", [
    ("server", "port", "8080", 8080),                          # int
    ("server", "port", " 8080 ", 8080),
    ("server", "port", "0", 0),                                # the minimum
    ("server", "port", "65535", 65535),
    ("server", "header_timeout_s", "2.5", 2.5),                # float
    ("server", "header_timeout_s", "3", 3.0),
    ("server", "header_timeout_s", "1e-3", 0.001),
    ("server", "access_log", "on", True),                      # bool, every spelling
    ("server", "access_log", "off", False),
    ("server", "access_log", "Yes", True),
    ("server", "access_log", "no", False),
    ("server", "access_log", "TRUE", True),
    ("server", "access_log", "false", False),
    ("server", "access_log", "1", True),
    ("server", "access_log", "0", False),
    ("server", "host", " 0.0.0.0 ", "0.0.0.0"),                # str, stripped
    ("state", "durability", "batch", "batch"),                 # choices
    ("state", "durability", "off", "off"),
    ("limits", "forwarded_header", "forwarded", "forwarded"),
    ("limits", "dry_run", "all", "all"),
    ("static", "clean_urls", "on", True),
    ("cache", "max_bytes", "1024", 1024),
], ids=short_id)
def test_values_of_each_kind(tmp_path, section, key, raw, expected):
    value = loaded(tmp_path, section, key, raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("section, key, raw, message", [
    ("server", "port", "eighty", "'eighty' is not a whole number"),
    ("server", "port", "80.5", "'80.5' is not a whole number"),
    ("server", "port", "", "'' is not a whole number"),
    ("server", "port", "65536", "'65536' is not a TCP port (0-65535)"),
    ("server", "header_timeout_s", "soon", "'soon' is not a number"),
    ("server", "header_timeout_s", "nan", "'nan' is not a finite number"),
    ("server", "access_log", "maybe", "'maybe' is not on/off (true/false, yes/no, 1/0)"),
    ("server", "access_log", "", "'' is not on/off"),
    ("state", "durability", "sometimes", "'sometimes' is not one of always, batch, off"),
    ("state", "durability", "ALWAYS", "is not one of always, batch, off"),   # choices: exact
    ("limits", "forwarded_header", "x-real-ip", "is not one of x-forwarded-for, forwarded"),
    ("sessions", "cookie_name", "my session", "'my session' is not a cookie name"),
    # per-route sections
    ("limits /api", "burst", "5", 'write a per-route section as [limits "/path"]'),
    ('limits "api"', "burst", "5", 'write a per-route section as [limits "/path"]'),
    ("limits '/api'", "burst", "5", 'write a per-route section as [limits "/path"]'),
    ("limitsx", "burst", "5", 'write a per-route section as [limits "/path"]'),
    ('limits "/api"', "rate", "5", "unknown key; [limits \"/api\"] knows: burst, dry_run, "
                                   "rate_per_s"),
    ('limits "/api"', "burst", "0", "'0' is below the minimum 1"),
    ('limits "/api"', "rate_per_s", "0", "'0' is below the minimum 0.001"),
    ('limits "/api"', "dry_run", "perhaps", "is not on/off"),
], ids=short_id)
def test_bad_values_name_file_section_key_and_rule(tmp_path, section, key, raw, message):
    text = loaded(tmp_path, section, key, raw)
    assert text.startswith("error: %s [%s] %s: " % (tmp_path / "setup.cfg", section, key))
    assert message in text


@pytest.mark.parametrize("key, raw", [
    ("write_timeout_s", "inf"),
    ("keepalive_timeout_s", "inf"),
    ("header_timeout_s", "1e400"),
], ids=short_id)
def test_infinite_timeouts_are_refused_at_start_up(tmp_path, key, raw):
    result = loaded(tmp_path, "server", key, raw)
    assert isinstance(result, str) and result.startswith("error: "), result


# --- minimums: the minimum passes, just below it fails -------------------------------------------

def minimum_rows():
    rows = []
    for section, settings in SETTINGS.items():
        for setting in settings:
            if setting.minimum is None or setting.kind not in ("int", "float"):
                continue
            below = setting.minimum - (1 if setting.kind == "int" else
                                       max(setting.minimum / 10, 0.0001))
            rows.append(pytest.param(section, setting, below, id="%s.%s" % (section, setting.name)))
    return rows


@pytest.mark.parametrize("section, setting, below", minimum_rows())
def test_every_minimum_is_a_boundary(section, setting, below, tmp_path):
    overrides = {}
    if section == "server" and setting.name == "max_head_bytes":
        overrides["max_request_line_bytes"] = 64      # else its own default (8192) exceeds it
    if section == "limits" and setting.name == "ban_max_s":
        overrides["limits.ban_s"] = 0.001             # else ban_s (600) exceeds it
    key = "%s.%s" % (section, setting.name)
    config = load_config(None, dict(overrides, **{key: str(setting.minimum)}))
    assert getattr(getattr(config, section), setting.name) == setting.minimum
    with pytest.raises(ConfigError, match="below the minimum"):
        load_config(None, dict(overrides, **{key: str(below)}))


def test_the_minimum_table_is_not_empty():
    assert len(minimum_rows()) > 40        # every int and float setting with a minimum


def maximum_rows():
    return [pytest.param(section, setting, id="%s.%s" % (section, setting.name))
            for section, settings in SETTINGS.items() for setting in settings
            if setting.maximum is not None]


@pytest.mark.parametrize("section, setting", maximum_rows())
def test_every_maximum_is_a_boundary(section, setting):
    """A wait past LONGEST_WAIT_S used to pass the checks and then raise at run time
    (keepalive_timeout_s 1e30 in poll(), worker_write_s 1e30 in struct.pack for SO_SNDTIMEO)."""
    key = "%s.%s" % (section, setting.name)
    config = load_config(None, {key: str(setting.maximum)})
    assert getattr(getattr(config, section), setting.name) == setting.maximum
    with pytest.raises(ConfigError, match="above the maximum"):
        load_config(None, {key: "1e30" if setting.kind == "float" else "1" + "0" * 30})


def test_every_server_wait_has_a_maximum():
    waits = [setting.name for setting in SETTINGS["server"]
             if setting.kind == "float" and setting.name.endswith("_s")
             and not setting.name.endswith("bytes_s")]
    assert waits and [row.values[1].name for row in maximum_rows()
                      if row.values[0] == "server"] == waits


# --- unknown sections and keys --------------------------------------------------------------------

def test_unknown_key_names_file_section_key_and_what_the_section_knows(tmp_path):
    path = write_config(tmp_path, "[server]\nport = 1\nmax_body_byte = 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith("%s [server] max_body_byte: unknown key; [server] knows: " % path)
    assert "max_body_bytes" in message and "port" in message


def test_sections_of_other_tools_are_left_alone(tmp_path):
    path = write_config(tmp_path, "[metadata]\nname = x\n[tool:pytest]\naddopts = -q\n"
                                  "[server]\nport = 1\n")
    assert load_config(path).server.port == 1


@pytest.mark.parametrize("section, ours", [("sever", "server"), ("limit", "limits"),
                                           ("Static", "static"), ("caches", "cache")])
def test_a_misspelt_section_of_ours_is_refused(tmp_path, section, ours):
    path = write_config(tmp_path, "[%s]\nport = 1\n" % section)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == "%s: unknown section [%s]; did you mean [%s]?" % (path, section, ours)


@pytest.mark.parametrize("dotted, raw, message", [
    ("nosuch.key", "1", "setting 'nosuch.key': unknown section [nosuch]"),
    ("server.nosuch", "1", "setting 'server.nosuch': unknown key; [server] knows: "),
    ("nosuch", "1", "setting 'nosuch': unknown key; [server] knows: "),   # no section: [server]
    ("port", "x", "setting 'port': 'x' is not a whole number"),
    ("port", 70000, "setting 'port': 70000 is not a TCP port"),
    ("state.durability", "never", "setting 'state.durability': 'never' is not one of"),
], ids=short_id)
def test_overrides_are_checked_like_the_file(dotted, raw, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, {dotted: raw})
    assert str(error.value).startswith(message)


def test_overrides_win_over_the_file_which_wins_over_the_defaults(tmp_path):
    path = write_config(tmp_path, "[server]\nport = 1\nworker_threads = 3\n")
    config = load_config(path, {"port": "2", "server.max_body_bytes": 7})
    assert (config.server.port, config.server.worker_threads, config.server.max_body_bytes) \
        == (2, 3, 7)
    assert config.server.max_header_count == 100       # untouched: the default


@pytest.mark.parametrize("text, message", [
    ("port = 1\n", "cannot be read"),                                # no section header
    ("[server]\nport = 1\nport = 2\n", "cannot be read"),            # a duplicate key
    ("[server]\n[server]\n", "cannot be read"),                      # a duplicate section
], ids=["no-section", "duplicate-key", "duplicate-section"])
def test_unreadable_files_are_refused_with_their_name(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(path + ": " + message)


def test_a_missing_file_is_refused_with_its_name(tmp_path):
    missing = str(tmp_path / "nope.cfg")
    with pytest.raises(ConfigError, match="nope.cfg: cannot be read"):
        load_config(missing)


def test_the_shipped_setup_cfg_loads():
    config = load_config(DEFAULT_CONFIG_FILE)
    assert config.server.port == 8000 and config.allowed_hosts is None


# --- cross-setting rules ------------------------------------------------------------------------

@pytest.mark.parametrize("line, head, ok", [
    (8192, 8192, True),
    (8193, 8192, False),
    (64, 256, True),
    (300, 256, False),
])
def test_request_line_must_fit_in_the_head(line, head, ok):
    overrides = {"max_request_line_bytes": line, "max_head_bytes": head}
    if ok:
        assert load_config(None, overrides).server.max_request_line_bytes == line
    else:
        with pytest.raises(ConfigError, match="max_request_line_bytes must not exceed "
                                              "max_head_bytes"):
            load_config(None, overrides)


# --- paths --------------------------------------------------------------------------------------

def test_relative_dirs_are_resolved_against_the_config_files_directory(tmp_path):
    (tmp_path / "etc").mkdir()
    path = write_config(tmp_path / "etc", "[server]\npages_dir = site\ndata_dir = ../var/data\n")
    config = load_config(path)
    assert config.server.pages_dir == os.path.join(str(tmp_path / "etc"), "site")
    assert os.path.normpath(config.server.data_dir) == str(tmp_path / "var" / "data")


def test_absolute_dirs_stay_and_defaults_follow_the_config_file(tmp_path):
    path = write_config(tmp_path, "[server]\ndata_dir = %s\n" % (tmp_path / "elsewhere"))
    config = load_config(path)
    assert config.server.data_dir == str(tmp_path / "elsewhere")
    assert config.server.pages_dir == os.path.join(str(tmp_path), "pages")


def test_relative_overrides_resolve_like_the_file(tmp_path):
    path = write_config(tmp_path, "[server]\n")
    assert load_config(path, {"pages_dir": "www"}).server.pages_dir \
        == os.path.join(str(tmp_path), "www")


def test_without_a_file_dirs_are_relative_to_the_checkout():
    assert load_config(None).server.pages_dir == os.path.join(ROOT, "pages")


# --- [limits "/path"] sections ------------------------------------------------------------------

def test_per_route_sections_reach_the_guard_policy(tmp_path):
    path = write_config(tmp_path, '[limits]\nroute_rate_per_s = 5\nroute_burst = 30\n'
                                  '[limits "/api/login"]\nrate_per_s = 0.1\nburst = 5\n'
                                  '[limits "/api/"]\ndry_run = on\n')
    config = load_config(path)
    key, policy, dry = config.guard.route_for("/api/login")
    assert (policy.rate_per_s, policy.burst, dry) == (0.1, 5, False)
    key, policy, dry = config.guard.route_for("/api/notes")
    assert (policy.rate_per_s, policy.burst, dry) == (5, 30, True)    # unset keys: [limits]
    key, policy, dry = config.guard.route_for("/other")
    assert (key, policy.rate_per_s, dry) == ("/other", 5, False)
    assert not any(name.startswith("limits ") for name in vars(config))


# --- allowed_hosts ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("  ", None),
    ("example.org", ({"example.org"}, ())),
    ("Example.ORG", ({"example.org"}, ())),
    ("example.org, www.example.org", ({"example.org", "www.example.org"}, ())),
    ("a.example\tb.example\nc.example", ({"a.example", "b.example", "c.example"}, ())),
    (".example.org", ({"example.org"}, (".example.org",))),
    ("localhost 192.0.2.7 [::1] [2001:DB8::1]",
     ({"localhost", "192.0.2.7", "[::1]", "[2001:db8::1]"}, ())),
    ("xn--caf-dma.example", ({"xn--caf-dma.example"}, ())),
], ids=short_id)
def test_parse_allowed_hosts(text, expected):
    result = parse_allowed_hosts(text, "setup.cfg")
    assert (result if result is None else (set(result[0]), result[1])) == expected


@pytest.mark.parametrize("name", ["http://example.org", "example.org:8000", "example.org/",
                                  "*.example.org", "-example.org",
                                  "example-.org", "example..org", "caf\xe9.example", "[::1",
                                  "user@example.org"], ids=short_id)
def test_parse_allowed_hosts_refuses_what_is_not_a_host_name(name):
    with pytest.raises(ConfigError) as error:
        parse_allowed_hosts("good.example " + name, "my.cfg")
    assert str(error.value).startswith("my.cfg [server] allowed_hosts: ")


def test_allowed_hosts_in_a_file(tmp_path):
    path = write_config(tmp_path, "[server]\nallowed_hosts = .example.org localhost\n")
    assert host_allowed(load_config(path).allowed_hosts, "www.example.org:8000")
    with pytest.raises(ConfigError, match=r"setup.cfg \[server\] allowed_hosts: 'x:1'"):
        load_config(write_config(tmp_path, "[server]\nallowed_hosts = x:1\n"))


ALLOWED = parse_allowed_hosts("example.org .example.net 192.0.2.7 [2001:db8::1] localhost",
                              "test")


@pytest.mark.parametrize("host, allowed", [
    ("example.org", True),
    ("example.org:8000", True),                # the port is not part of the name
    ("EXAMPLE.org", True),                     # case-insensitive
    ("example.org.", True),                    # the fully qualified form
    ("example.org.:80", True),
    ("www.example.org", False),                # exact names have no subdomains
    ("example.net", True),                     # ".example.net" is itself
    ("www.example.net", True),                 # and its subdomains
    ("a.b.example.net:443", True),
    ("badexample.net", False),                 # a suffix at a dot, not any suffix
    ("example.net.evil.org", False),
    ("192.0.2.7", True),
    ("192.0.2.7:8000", True),
    ("192.0.2.70", False),
    ("[2001:db8::1]", True),
    ("[2001:DB8::1]:8080", True),
    ("[2001:db8::2]", False),
    ("2001:db8::1", False),                    # IPv6 without brackets is not a host
    ("localhost:8000", True),
    ("", False),
    (":80", False),
    ("evil.org", False),
], ids=short_id)
def test_host_allowed(host, allowed):
    assert host_allowed(ALLOWED, host) is allowed
