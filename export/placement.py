"""Where a build's output goes, and what vtc may delete (`vtc-export build`, `engine`, `sweep`).

    check_output(out, src, force)          validation only, nothing written (build.prepare)
    with claim_output(out, src, force) as claim:
        write into claim.path              .<name>.partial-XXXXXXXX/new, next to the output
        claim.commit()                     re-check the output, then rename the new directory into place
    (leaving the block releases the claim: an uncommitted build is removed, the lock file too)

Promises (docs/DESIGN.md, threat model):
* One build per output at a time: `.<name>.lock` next to it is held with flock(2) for the whole build
  (the kernel drops it when the process dies, even by SIGKILL); a second build fails at once.
* A partial directory holds `owner.json` (schema vtc.partial: pid, host, process start time, output name).
  A later build of the same output removes `.<name>.partial-*` directories whose owner is dead, and only
  those: never one without that file, never one whose owner runs (or runs on another host). SIGTERM and
  SIGHUP during a build raise BuildInterrupted (a KeyboardInterrupt), so the normal cleanup runs.
* `--force` replaces only a complete vtc artifact: its manifest.json parses as a vtc manifest and every
  other entry is a regular file listed in its `files` table, or a directory of such (no symlinks). An empty
  directory may be used. Anything else: refused, naming the unknown entries.
* commit() refuses if the output appeared, or changed, since it was claimed (another inode, or entries
  the manifest does not list); what is there is not touched and the finished artifact is kept next to it
  as `<name>.vtc-built-<time>`. The final rename never replaces anything (renameat2 RENAME_NOREPLACE).
* The replaced artifact is moved aside (a rename into the partial directory) and deleted file by file:
  only the regular files it listed, then the emptied directories. Symlinks are never followed; anything
  else is kept, renamed `<name>.kept-<time>`, and named in a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from vtc.runtime.errors import UsageError

OWNER = "owner.json"  # inside a partial directory: whose it is
OWNER_SCHEMA = "vtc.partial"
LOCK_SCHEMA = "vtc.lock"  # the record in `.<name>.lock`
NEW = "new"  # the directory being built, renamed to the target at commit
OLD = "old"  # the replaced target, moved aside at commit and then deleted file by file
OLD_LIST = "old-files.json"  # the files of OLD vtc may delete (relative paths), written before the move
STAGED = "manifest.json"  # `vtc-export engine`: the artifact's next manifest, replaced in after the swap
MAX_MANIFEST_BYTES = 64 << 20
SHOW = 5  # unknown entries named in an error


class BuildInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a build: raised so that the build's cleanup runs (the CLI exits 130)."""


# -- signals ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def signals_raise():
    """For the duration of the block, SIGTERM and SIGHUP raise BuildInterrupted (once: a second signal
    during the cleanup is ignored so that the cleanup finishes). Ignored signals stay ignored (nohup);
    the previous handlers are restored. Only the main thread can install handlers: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise BuildInterrupted(f"{signal.Signals(signum).name} received")

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        old = signal.getsignal(sig)
        if old in (signal.SIG_IGN, None):  # None: installed outside Python; leave it alone
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- owners: who wrote a partial directory, and is it still running --------------------------------
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), to tell a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _owner_record(name: str) -> dict:
    pid = os.getpid()
    return {"schema": OWNER_SCHEMA, "pid": pid, "host": socket.gethostname(), "start": _proc_start(pid),
            "output": name}


def _valid_pid(pid) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 22


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True unless the process is certainly gone (or its pid now belongs to a process started later)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or we cannot tell: alive
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def _read_owner(partial: Path) -> dict | None:
    """The partial directory's owner record, or None if it is not one vtc wrote (then it is never removed)."""
    try:
        st = os.lstat(partial / OWNER)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return None
        rec = json.loads((partial / OWNER).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(rec, dict) or rec.get("schema") != OWNER_SCHEMA or not _valid_pid(rec.get("pid"))
            or not isinstance(rec.get("output"), str) or not isinstance(rec.get("host"), str)):
        return None
    return rec


def _owner_dead(rec: dict) -> bool:
    if rec["host"] != socket.gethostname():
        return False  # another machine's build (a shared disk): we cannot tell, keep it
    start = rec.get("start")
    return not pid_alive(rec["pid"], start if isinstance(start, str) else None)


def _is_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


# -- the output, checked -----------------------------------------------------------------------------
def _abs(out: Path) -> Path:
    """Absolute and normalised (`a/..` and `.` resolved textually; symlinks in the parents are kept)."""
    return Path(os.path.abspath(os.path.expanduser(str(out))))


def _scan(root: Path, listed: set[str]) -> tuple[list[str], list[str]]:
    """(unknown, present) entries under root, walked without following symlinks: `present` are the
    regular files whose relative path is in `listed`; anything else that is not a directory is unknown
    (a directory is unknown only through what it holds)."""
    unknown, present = [], []
    stack = [("", root)]
    while stack:
        rel_dir, d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            unknown.append(f"{rel_dir or '.'} (unreadable: {e.strerror})")
            continue
        for e in entries:
            rel = f"{rel_dir}{e.name}"
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                unknown.append(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((rel + "/", Path(e.path)))
            elif stat.S_ISREG(st.st_mode) and rel in listed:
                present.append(rel)
            else:
                unknown.append(rel + (" (symbolic link)" if stat.S_ISLNK(st.st_mode) else ""))
    return sorted(unknown), sorted(present)


def _read_manifest(d: Path):
    """The vtc manifest of directory d (vtc.runtime.manifest.parse), or (None, why)."""
    from vtc.runtime import manifest as mf

    path = d / mf.MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, f"it has no {mf.MANIFEST}"
    except OSError as e:
        return None, f"its {mf.MANIFEST} cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, f"its {mf.MANIFEST} is not a regular file"
    if st.st_size > MAX_MANIFEST_BYTES:
        return None, f"its {mf.MANIFEST} is {st.st_size} bytes, more than any vtc manifest"
    try:
        m = mf.parse(path.read_bytes().decode("utf-8"), str(path))
        if not isinstance(m.files, dict) or not all(isinstance(k, str) for k in m.files):
            raise ValueError("its files table is not a mapping of paths")
    except Exception as e:  # noqa: BLE001 - whatever is wrong, it is not a manifest vtc can trust
        why = " ".join(str(getattr(e, "what", e)).split())[:200] or type(e).__name__
        return None, f"its {mf.MANIFEST} is not a vtc manifest ({why})"
    return m, ""


def artifact_listing(d: Path, where: str) -> list[str]:
    """The files of directory d that vtc may delete: manifest.json and every regular file its manifest
    lists. Raises UsageError (naming `where`) unless d is empty or a complete vtc artifact with nothing
    else in it."""
    from vtc.runtime import manifest as mf

    try:
        empty = not any(os.scandir(d))
    except OSError as e:
        raise UsageError(f"{where} cannot be read ({e.strerror}).", "Choose another --output.") from e
    if empty:
        return []
    m, why = _read_manifest(d)
    if m is None:
        raise UsageError(f"{where} is not a vtc artifact: {why}; --force replaces only a directory that "
                         "`vtc-export build` wrote.", "Choose another --output, or empty that directory yourself.")
    unknown, present = _scan(d, set(m.files) | {mf.MANIFEST})
    if unknown:
        more = f" and {len(unknown) - SHOW} more" if len(unknown) > SHOW else ""
        raise UsageError(f"{where} holds {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} that are not "
                         f"part of the vtc artifact there: {', '.join(unknown[:SHOW])}{more}; --force would "
                         "delete them.", "Move them out, or choose another --output.")
    return present


def check_output(out: Path, src: Path | None, force: bool) -> None:
    """The output may be new, or (with --force) an existing vtc artifact or empty directory; never a file,
    a symlink, the source checkpoint (or a directory above it), a directory that holds anything the
    artifact does not list, or an output another build is writing. Writes nothing."""
    _validate(Path(out), _abs(Path(out)), src, force)


def _no_name(out: Path, path: Path) -> None:
    """`.`, `..`, `a/..`, `/`: the output must be a directory of its own, not the current or a parent one."""
    if Path(out).name in ("", ".", "..") or path.name in ("", ".", ".."):
        raise UsageError(f"--output {out} names no directory of its own (the current, a parent or the root "
                         "directory).", "Pass e.g. --output artifacts/my-model.")


def _validate(out: Path, path: Path, src: Path | None, force: bool, probe_lock: bool = True) -> tuple | None:
    """check_output; returns the identity (st_dev, st_ino) of an existing output, None if there is none.
    `probe_lock=False` once we hold the output's lock ourselves."""
    _no_name(out, path)
    holder = _lock_holder(path) if probe_lock else None
    if holder is not None:
        raise UsageError(f"another vtc-export build ({holder}) is writing {out} right now.",
                         "Wait for it to finish, or choose another --output.")
    _check_parent(out, path)
    if not _lexists(path):
        return None
    if path.is_symlink():
        raise UsageError(f"--output {out} is a symbolic link; vtc replaces only a directory it built.",
                         "Pass the directory the link points to, or another --output.")
    if not force:
        raise UsageError(f"output directory {out} already exists.", "Pass --force to replace it, or choose --output.")
    if not path.is_dir():
        raise UsageError(f"--output {out} is an existing file, not an artifact directory.", "Choose another --output.")
    if src is not None:
        resolved, source = path.resolve(), Path(src).expanduser().resolve()
        if resolved == source or resolved in source.parents:
            raise UsageError(f"--output {out} is (or contains) the source checkpoint {src}; --force would delete it.",
                             "Choose another --output.")
    artifact_listing(path, f"--output {out}")
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _check_parent(out: Path, path: Path) -> None:
    """The nearest existing ancestor is a directory we may write in (the parents are created later)."""
    anc = path.parent
    while not _lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot create --output {out}: {anc} is a file, not a directory.", "Choose another --output.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create --output {out}: no permission to write in {anc}.",
                         "Choose a directory you can write to.")


# -- the lock ----------------------------------------------------------------------------------------
def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _describe_holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(rec['pid'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _ours(fd: int) -> bool:
    """An empty file (just created) or a vtc lock record (a killed build's)."""
    try:
        data = os.pread(fd, 4097, 0)
        if not data:
            return True
        rec = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("schema") == LOCK_SCHEMA


def _lock_holder(path: Path) -> str | None:
    """Who holds the output's lock now (a read-only probe; creates nothing), or None."""
    try:
        import fcntl
    except ImportError:  # no flock: the exclusive-create lock of _acquire
        try:
            fd = os.open(_lock_path(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            rec = json.loads(os.read(fd, 4096).decode("utf-8"))
            return f"pid {rec['pid']}" if _valid_pid(rec.get("pid")) and pid_alive(rec["pid"]) else None
        except (OSError, ValueError, AttributeError):
            return None
        finally:
            os.close(fd)
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    """An exclusive lock on `.<name>.lock` next to path: its fd (holding our owner record)."""
    lock = _lock_path(path)
    record = json.dumps({**_owner_record(path.name), "schema": LOCK_SCHEMA}).encode()
    try:
        import fcntl
    except ImportError:
        fcntl = None
    for _ in range(100):
        try:
            if fcntl is None:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            else:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:  # no flock: an existing lock file is stale only if its owner died
            if _lock_holder(path) is None:
                lock.unlink(missing_ok=True)
                continue
            raise UsageError(f"another vtc-export build ({_lock_holder(path)}) is writing {what} right now.",
                             "Wait for it to finish, or choose another --output.") from None
        except OSError as e:
            raise UsageError(f"cannot create the lock file {lock} for {what} ({e.strerror}).",
                             "Choose an output in a directory you can write to (remove the lock file if it "
                             "is a link).") from e
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(fd)
                os.close(fd)
                raise UsageError(f"another vtc-export build ({holder}) is writing {what} right now.",
                                 "Wait for it to finish, or choose another --output.") from None
            # the previous holder unlinks the file before it lets go: make sure we locked the file on disk
            try:
                same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        if not _ours(fd):  # a file of that name that vtc did not write: never overwrite or delete it
            os.close(fd)
            raise UsageError(f"{lock} exists and is not a vtc lock file; vtc would overwrite it.",
                             "Move it away, or choose another --output.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd
    raise UsageError(f"could not lock {lock} for {what}.", "Try again.")


def _release_lock(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        _lock_path(path).unlink(missing_ok=True)  # while still holding it (see _acquire)
    finally:
        os.close(fd)


# -- deleting only what vtc wrote --------------------------------------------------------------------
def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def remove_listed(root: Path, listed) -> list[str]:
    """Delete the regular files `listed` (paths relative to root) one by one, then the directories that are
    then empty, root last. Symlinks are never followed nor removed; a listed path that is not a regular file
    is left. Returns what is left under root (relative paths, at most a few), [] if root is gone."""
    for rel in listed:
        if not isinstance(rel, str) or not _safe_rel(rel):
            continue
        p, ok = root, True
        for part in rel.split("/")[:-1]:
            p = p / part
            if not _is_dir(p):  # a missing or symlinked parent: nothing of ours below it
                ok = False
                break
        if not ok:
            continue
        p = root / rel
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        except FileNotFoundError:
            pass
    for dirpath, dirnames, _files in os.walk(root, topdown=False):  # never descends into symlinks
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(dirpath, d))  # fails on non-empty directories and on symlinks
    with contextlib.suppress(OSError):
        os.rmdir(root)
    if not _lexists(root):
        return []
    return _scan(root, set())[0] or ["(something unreadable)"]


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _visible_name(parent: Path, base: str) -> Path:
    p = parent / base
    i = 1
    while _lexists(p):
        i += 1
        p = parent / f"{base}-{i}"
    return p


def _warn(msg: str) -> None:
    print("warning: " + " ".join(msg.split()), file=sys.stderr)


def _keep(old: Path, target: Path, why: str, left: list[str]) -> Path:
    """Rename a moved-aside directory that still holds something vtc may not delete to a visible name."""
    dest = _visible_name(target.parent, f"{target.name}.kept-{_stamp()}")
    try:
        rename_noreplace(old, dest)
    except OSError:
        dest = old
    shown = ", ".join(left[:SHOW]) + (f" and {len(left) - SHOW} more" if len(left) > SHOW else "")
    _warn(f"{why}: kept in {dest} ({shown}). Look at it, then delete it yourself.")
    return dest


# -- atomic rename that never replaces ----------------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst; FileExistsError if dst exists (atomically where the kernel and file system offer
    RENAME_NOREPLACE, else checked just before the rename)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(str(src)), _AT_FDCWD, os.fsencode(str(dst)), _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), str(src), None, str(dst))
    if _lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# -- partial directories -----------------------------------------------------------------------------
def _new_partial(parent: Path, name: str) -> Path:
    """`.<name>.partial-XXXXXXXX` with our owner record and an empty NEW directory, all 0755."""
    for _ in range(100):
        partial = parent / f".{name}.partial-{secrets.token_hex(4)}"
        try:
            os.mkdir(partial, 0o755)
        except FileExistsError:
            continue
        break
    else:
        raise UsageError(f"could not create a temporary directory in {parent}.", "Try again.")
    try:
        os.chmod(partial, 0o755)  # the umask may have narrowed it; an artifact is meant to be shared
        fd = os.open(partial / OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(_owner_record(name), f)
        os.mkdir(partial / NEW, 0o755)
        os.chmod(partial / NEW, 0o755)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return partial


def dispose(partial: Path, target: Path, manifest_target: Path | None = None) -> None:
    """Finish with a partial directory, ours or a dead build's. If NEW is still there the swap did not
    happen: a moved-aside OLD goes back to the target (if that is free); else the swap happened: a staged
    manifest is renamed over `manifest_target` (`vtc-export engine`) and OLD is deleted file by file.
    Then the partial directory itself (vtc's own files only) is removed."""
    new, old, staged = partial / NEW, partial / OLD, partial / STAGED
    swapped = not _is_dir(new)
    if not swapped and _is_dir(old) and not _lexists(target):
        with contextlib.suppress(OSError):  # restore what the target was (if it is still free)
            rename_noreplace(old, target)
    if swapped and manifest_target is not None and stat.S_ISREG(_lstat_mode(staged)):
        os.replace(staged, manifest_target)  # the new files are in place: the manifest that lists them
    if _is_dir(old):
        if not swapped:  # the target was taken by something else meanwhile: delete nothing
            _keep(old, target, f"the previous {target.name} could not be put back", _scan(old, set())[0] or ["(empty)"])
        else:
            try:
                listed = json.loads((partial / OLD_LIST).read_text())
                listed = listed if isinstance(listed, list) else []
            except (OSError, ValueError):
                listed = []
            left = remove_listed(old, listed)
            if left:
                _keep(old, target, f"the replaced {target.name} held entries vtc did not write", left)
    shutil.rmtree(partial, ignore_errors=True)  # rmtree never follows symlinks


def _lstat_mode(p: Path) -> int:
    try:
        return os.lstat(p).st_mode
    except OSError:
        return 0


def remove_stale(parent: Path, name: str, target: Path, manifest_target: Path | None = None) -> list[Path]:
    """Dispose of `.<name>.partial-*` directories in parent whose owner record says vtc made them for
    `name` and whose owner process is gone (killed). Returns those removed."""
    removed = []
    prefix = f".{name}.partial-"
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for e in entries:
        p = Path(e.path)
        if not _is_dir(p):
            continue
        rec = _read_owner(p)
        if rec is None or rec["output"] != name or not _owner_dead(rec):
            continue
        try:
            dispose(p, target, manifest_target)
        except OSError as err:
            _warn(f"could not remove {p}, a killed vtc run's temporary directory ({err}); delete it yourself.")
            continue
        removed.append(p)
    return removed


def remove_dead_pid_files(directory: Path, prefix: str) -> list[Path]:
    """Regular files `<prefix><pid>` in directory whose pid is not running (e.g. sweep's state file
    written to a temporary name by a killed process)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        tail = e.name[len(prefix):] if e.name.startswith(prefix) else ""
        if not tail.isdigit() or not _valid_pid(int(tail)) or pid_alive(int(tail)):
            continue
        if e.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


# -- the claim --------------------------------------------------------------------------------------
@dataclass
class Claim:
    """An output being built. `path` is where to write; `commit()` puts it in place; `release()` (always)
    removes whatever was not committed and the lock."""

    out: Path  # as the user gave it (messages)
    target: Path  # absolute
    partial: Path
    identity: tuple | None  # (st_dev, st_ino) of the existing output at claim time, None if absent
    lock_fd: int | None
    listing: object  # callable(dir) -> the files vtc may delete there; raises UsageError if anything else
    manifest_target: Path | None = None
    committed: bool = False
    kept: Path | None = None  # where a finished build went when commit() refused
    _released: bool = field(default=False, repr=False)

    @property
    def path(self) -> Path:
        return self.partial / NEW

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def commit(self, staged_manifest: str | None = None) -> None:
        """Re-check the target against the claim, move an old one aside, rename NEW into place (never
        over anything), then (`staged_manifest`) replace the manifest. Refuses if the target appeared or
        changed meanwhile: it is left untouched and the finished build is kept next to it."""
        if staged_manifest is not None:
            (self.partial / STAGED).write_text(staged_manifest)
        try:
            st = os.lstat(self.target)
        except FileNotFoundError:
            st = None
        if st is not None:
            if self.identity is None or (st.st_dev, st.st_ino) != self.identity or not stat.S_ISDIR(st.st_mode):
                self._refuse("appeared" if self.identity is None else "was replaced by something else")
            try:
                listed = self.listing(self.target)
            except UsageError as e:
                self._refuse(f"changed ({e.what})")
            (self.partial / OLD_LIST).write_text(json.dumps(listed))
            os.rename(self.target, self.partial / OLD)
        try:
            rename_noreplace(self.path, self.target)
        except OSError as e:
            self._put_back_old()
            if isinstance(e, FileExistsError) or e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                self._refuse("appeared")
            raise
        self.committed = True
        if self.manifest_target is not None:  # last: the manifest names only files that are in place
            os.replace(self.partial / STAGED, self.manifest_target)

    def _put_back_old(self) -> None:
        """The swap failed after the old target was moved aside: put it back, or keep it visibly."""
        old = self.partial / OLD
        if not _is_dir(old):
            return
        try:
            rename_noreplace(old, self.target)
        except OSError:
            _keep(old, self.target, f"the previous {self.target.name} could not be put back",
                  _scan(old, set())[0] or ["(empty)"])

    def _refuse(self, how: str) -> NoReturn:
        if self.manifest_target is None:  # a build: keep the finished artifact, visibly, next to the output
            self.kept = _visible_name(self.target.parent, f"{self.target.name}.vtc-built-{_stamp()}")
            try:
                rename_noreplace(self.path, self.kept)
            except OSError:
                self.kept = None
        keep = (f"the finished artifact is in {self.kept}: move it where you want it"
                if self.kept else "the finished build was discarded")
        raise UsageError(f"{self.out} {how} while the build ran; it was left as it is and {keep}.",
                         "Choose an --output nothing else writes to.")

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if _lexists(self.partial):
                try:
                    dispose(self.partial, self.target, self.manifest_target)
                except OSError as err:  # never hide the build's own error behind a cleanup failure
                    _warn(f"could not finish cleaning {self.partial} ({err}); the next build for "
                          f"{self.out} removes it.")
        finally:
            _release_lock(self.target, self.lock_fd)


def claim_output(out: Path, src: Path | None, force: bool) -> Claim:
    """Lock the output, remove dead builds' partial directories for it, validate it again (check_output)
    and create the partial directory to build in."""
    out = Path(out)
    path = _abs(out)
    _no_name(out, path)
    _check_parent(out, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the directory of --output {out} ({e.strerror}).",
                         "Choose another --output.") from e
    fd = _acquire(path, str(out))
    partial = None
    try:
        remove_stale(path.parent, path.name, path)
        identity = _validate(out, path, src, force, probe_lock=False)
        partial = _new_partial(path.parent, path.name)
        return Claim(out=out, target=path, partial=partial, identity=identity, lock_fd=fd,
                     listing=lambda d: artifact_listing(d, f"--output {out}"))
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        _release_lock(path, fd)
        raise


def claim_inside(art: Path, name: str, listed, manifest_target: Path) -> Claim:
    """`vtc-export engine`: claim `art/<name>` (a directory of the artifact). Its current contents may be
    replaced only if every entry is a regular file in `listed()` (paths relative to it; called after a dead
    run's partial directory was settled, which may have replaced the manifest)."""
    target = _abs(art) / name

    def listing(d: Path) -> list[str]:
        unknown, present = _scan(d, listed())
        if unknown:
            more = f" and {len(unknown) - SHOW} more" if len(unknown) > SHOW else ""
            raise UsageError(f"{d} holds entries the artifact's manifest does not list: "
                             f"{', '.join(unknown[:SHOW])}{more}; replacing it would delete them.",
                             "Move them out of the artifact, then run the command again.")
        return present

    fd = _acquire(target, str(Path(art) / name))
    partial = None
    try:
        remove_stale(target.parent, name, target, manifest_target)
        identity = None
        if _lexists(target):
            if not _is_dir(target):
                raise UsageError(f"{Path(art) / name} is not a directory.", "Move it out of the artifact.")
            listing(target)
            st = os.lstat(target)
            identity = st.st_dev, st.st_ino
        partial = _new_partial(target.parent, name)
        return Claim(out=Path(art) / name, target=target, partial=partial, identity=identity, lock_fd=fd,
                     listing=listing, manifest_target=manifest_target)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        _release_lock(target, fd)
        raise
