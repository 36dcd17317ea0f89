"""The store's file system calls: files only their owner may read, whole writes, fsync'd
directories.

Invariants: every file the store writes (journal, snapshot, lock, backups) is made 0600 and the
data directory 0700, whatever the process umask: the state is the application's data (sessions,
accounts), for the owner's eyes only. A write is whole or raises (``write_all`` loops over short
writes). A rename is durable only once its directory is fsync'd (``fsync_dir``).

Imports the standard library only.
"""
import os

# The state is the application's data (sessions, accounts): only the owner may read it, whatever
# the umask the server was started with.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def write_all(fd, data):
    written = 0
    while written < len(data):  # a write can be short, e.g. just below RLIMIT_FSIZE
        written += os.write(fd, data[written:])


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def open_private(path, flags):
    """os.open(path, flags | O_CREAT) as a file only its owner may read: 0600 whatever the
    process umask (fchmod, since the mode given to open is filtered through it), and an existing
    file from before files were private is made so too."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
