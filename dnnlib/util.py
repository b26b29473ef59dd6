"""General-purpose helpers: attribute dicts, name-based object lookup,
cached URL opening, and small parsing/formatting utilities."""

import contextlib
import errno
import hashlib
import html
import importlib
import io
import os
import posixpath
import re
import socket
import sys
import time
import urllib.parse
import uuid

__all__ = [
    "EasyDict", "make_cache_dir_path", "is_url", "open_url", "DownloadError",
    "get_module_from_obj_name", "get_obj_by_name", "call_func_by_name",
    "construct_class_by_name", "parse_int_list", "parse_range", "format_time",
    "atomic_path", "Progress", "Logger",
]

# ---------------------------------------------------------------------------
# EasyDict


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes.

    Missing keys raise AttributeError (not KeyError) from attribute access so
    that hasattr(), getattr(default), copy and pickle protocol probes work.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---------------------------------------------------------------------------
# Cache directory


def make_cache_dir_path(*paths):
    """Return a path inside the dnnlib cache directory.

    $DNNLIB_CACHE_DIR wins; otherwise ~/.cache/dnnlib, where ~ comes from
    HOME (or USERPROFILE on Windows). The directory is not created here.
    """
    root = os.environ.get("DNNLIB_CACHE_DIR")
    if not root:
        home = os.environ.get("HOME") or os.environ.get("USERPROFILE")
        if not home:  # e.g. stripped-down containers; still need somewhere
            home = os.path.expanduser("~")
        root = os.path.join(home, ".cache", "dnnlib")
    return os.path.join(root, *paths)


# ---------------------------------------------------------------------------
# URL opening

# Backoff between download attempts: _RETRY_DELAY, doubled each time, capped.
# Module-level so tests (and impatient callers) can shorten it.
_RETRY_DELAY = 1.0
_MAX_RETRY_DELAY = 10.0
_TIMEOUT = (10, 60)  # requests (connect, read) timeouts in seconds
_CHUNK_SIZE = 1 << 20
_MAX_GDRIVE_HOPS = 2


class DownloadError(OSError):
    """A URL could not be fetched. str() is a single line naming URL and reason."""

    def __init__(self, message, url=None, reason=None):
        super().__init__(message)
        self.url = url
        self.reason = reason


class _AttemptFailed(Exception):
    """Internal: one attempt failed for a reason we already put into words."""

    def __init__(self, reason, retryable):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def is_url(obj, allow_file_urls=False):
    """True if obj is a string of the form scheme://... (file:// only if allowed)."""
    if not isinstance(obj, str) or "://" not in obj:
        return False
    parts = urllib.parse.urlsplit(obj)
    if not parts.scheme:
        return False
    if parts.scheme.lower() == "file":
        return allow_file_urls
    return bool(parts.netloc)


def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, file:// URL or http(s):// URL as a binary file.

    Downloads are cached under `cache_dir` (default: the 'downloads' cache
    directory) as '<md5(url)>_<name>' and reused without network access.
    With return_filename=True the local filename is returned instead of a
    file object; for http(s) URLs this needs cache=True. With cache=False a
    download is returned as an in-memory BytesIO.
    """
    if not isinstance(url, str):
        raise TypeError(f"open_url expects a str, got {type(url).__name__}")
    if num_attempts < 1:
        raise ValueError("num_attempts must be at least 1")

    if "://" not in url:
        return _open_local(url, return_filename)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return _open_local(_file_url_to_path(url), return_filename)
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}")

    if not cache:
        if return_filename:
            raise ValueError("return_filename=True requires cache=True for remote URLs")
        buf = io.BytesIO()
        _download(url, buf, num_attempts, verbose)
        buf.seek(0)
        return buf

    path = os.path.join(cache_dir or make_cache_dir_path("downloads"), _cache_file_name(url))
    if not os.path.isfile(path):
        _download_atomically(url, path, num_attempts, verbose)
    return path if return_filename else open(path, "rb")


def _open_local(path, return_filename):
    if return_filename:
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return path
    return open(path, "rb")  # raises FileNotFoundError naming the path


def _file_url_to_path(url):
    # file:///abs/path and file://localhost/abs/path are the standard forms;
    # file://rel/path is accepted leniently as a relative path.
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        path = urllib.parse.unquote(parts.netloc) + path
    return path


def _cache_file_name(url):
    digest = hashlib.md5(url.encode("utf-8"), usedforsecurity=False).hexdigest()
    name = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:128] or "download"
    return f"{digest}_{name}"


def _download_atomically(url, path, num_attempts, verbose):
    # Write to a unique temp file next to the target and rename it into place,
    # so an interrupted or concurrent download never exposes a partial file.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            _download(url, f, num_attempts, verbose)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _download(url, sink, num_attempts, verbose):
    """Fetch `url` into the binary file object `sink`, retrying transient failures."""
    import requests

    if verbose:
        print(f"Downloading {url} ...", end=" ", file=sys.stderr, flush=True)
    try:
        with requests.Session() as session:
            for attempt in range(num_attempts):
                sink.seek(0)
                sink.truncate()
                try:
                    _fetch_once(session, url, sink)
                    break
                except (requests.RequestException, _AttemptFailed) as exc:
                    reason, retryable = _explain_failure(exc)
                    if not retryable or attempt + 1 >= num_attempts:
                        # `from None`: the one-line message is the whole story.
                        raise DownloadError(f"could not download {url}: {reason}",
                                            url=url, reason=reason) from None
                    time.sleep(min(_RETRY_DELAY * 2 ** attempt, _MAX_RETRY_DELAY))
    except BaseException:
        if verbose:
            print("failed", file=sys.stderr, flush=True)
        raise
    if verbose:
        print("done", file=sys.stderr, flush=True)


def _fetch_once(session, url, sink, hops=0):
    with session.get(url, stream=True, timeout=_TIMEOUT) as response:
        response.raise_for_status()
        if not _is_google_html(response):
            _copy_body(response, sink)
            return
        # Google Drive answers large-file requests with a "can't scan for
        # viruses" page; the real download sits behind a confirm token.
        next_url = _gdrive_confirm_url(response.url, response.text, session.cookies)
    if next_url is None:
        raise _AttemptFailed("Google Drive returned a web page instead of the file "
                             "(quota exceeded or file not shared?)", retryable=False)
    if hops >= _MAX_GDRIVE_HOPS:
        raise _AttemptFailed("too many Google Drive confirmation pages", retryable=False)
    _fetch_once(session, next_url, sink, hops + 1)


def _copy_body(response, sink):
    received = 0
    for chunk in response.iter_content(chunk_size=_CHUNK_SIZE):
        sink.write(chunk)
        received += len(chunk)
    # Content-Length counts encoded bytes, so only compare for identity bodies.
    expected = response.headers.get("Content-Length", "")
    if expected.isdigit() and not response.headers.get("Content-Encoding"):
        if received != int(expected):
            raise _AttemptFailed(f"connection closed after {received} of {expected} bytes",
                                 retryable=True)


def _is_google_html(response):
    host = (urllib.parse.urlsplit(response.url).hostname or "").lower()
    is_google = host == "google.com" or host.endswith(".google.com")
    return is_google and response.headers.get("Content-Type", "").startswith("text/html")


def _gdrive_confirm_url(url, page, cookies):
    """Find where a Google Drive interstitial page wants us to go next, or None."""
    # Older behaviour: the token comes as a 'download_warning*' cookie.
    for name, value in dict(cookies).items():
        if name.startswith("download_warning"):
            return _with_query(url, confirm=value)
    # Current behaviour: a GET form whose hidden fields include the token.
    for form_attrs, body in re.findall(r"<form\b([^>]*)>(.*?)</form>", page, re.S | re.I):
        attrs = _tag_attrs(form_attrs)
        fields = {}
        for input_attrs in re.findall(r"<input\b([^>]*)>", body, re.I):
            field = _tag_attrs(input_attrs)
            if "name" in field:
                fields[field["name"]] = field.get("value", "")
        if attrs.get("id") == "download-form" or "confirm" in fields:
            action = urllib.parse.urljoin(url, attrs.get("action", url))
            return _with_query(action, **fields)
    # Oldest behaviour: a plain link that already carries confirm=...
    match = re.search(r'href="([^"]*[?&](?:amp;)?confirm=[^"]*)"', page)
    if match:
        return urllib.parse.urljoin(url, html.unescape(match.group(1)))
    return None


def _tag_attrs(text):
    return {k.lower(): html.unescape(v) for k, v in re.findall(r'([\w-]+)\s*=\s*"([^"]*)"', text)}


def _with_query(url, **params):
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _explain_failure(exc):
    """Turn a failed attempt into (one-line reason, worth retrying?)."""
    import requests

    if isinstance(exc, _AttemptFailed):
        return exc.reason, exc.retryable
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        reason = f"HTTP {code} {exc.response.reason or ''}".strip()
        # Client errors are permanent; only server trouble and throttling may pass.
        return reason, code >= 500 or code in (408, 429)

    chain = _exception_chain(exc)
    # Resolution/route failures almost always mean "offline" or a bad host;
    # retrying them only makes the user wait, so give up immediately.
    if any(isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError" for e in chain):
        return "could not resolve host (offline?)", False
    codes = {e.errno for e in chain if isinstance(e, OSError) and isinstance(e.errno, int)}
    if codes & {errno.ENETUNREACH, errno.EHOSTUNREACH}:
        return "network unreachable (offline?)", False
    if errno.ECONNREFUSED in codes:
        return "connection refused", True
    if errno.ECONNRESET in codes:
        return "connection reset", True
    if isinstance(exc, requests.Timeout):
        return "timed out", True
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped during download", True
    if isinstance(exc, requests.ConnectionError):
        return "connection failed", True
    # Malformed URL and similar: nothing a retry can fix.
    return _one_line(str(exc)) or type(exc).__name__, False


def _exception_chain(exc):
    # requests/urllib3 nest the root cause in args, .reason and __cause__.
    seen, todo = [], [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])
    return seen


def _one_line(text, limit=200):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# Name-based lookup


def get_module_from_obj_name(obj_name):
    """Split a dotted name into (module, attribute path) using the longest
    importable module prefix, e.g. 'torch.nn.Linear' -> (torch.nn, 'Linear')."""
    parts = obj_name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only skip if this prefix itself is missing; a missing dependency
            # *inside* an existing module is a real error the user must see.
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue
            raise
        return module, ".".join(parts[i:])
    raise ImportError(f"cannot find a module for object name {obj_name!r}")


def get_obj_by_name(name):
    """Resolve a dotted name like 'package.module.Class.attr' to the object."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"object name must be a non-empty string, got {name!r}")
    module, attr_path = get_module_from_obj_name(name)
    obj = module
    for attr in attr_path.split(".") if attr_path else []:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AttributeError(f"cannot find {name!r}: {module.__name__!r} has no "
                                 f"attribute path {attr_path!r}") from None
    return obj


def call_func_by_name(*args, func_name=None, **kwargs):
    """Look up a function by dotted name and call it with the given arguments."""
    if func_name is None:
        raise ValueError("func_name must be given")
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f"{func_name!r} is not callable")
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    """Look up a class by dotted name and instantiate it with the given arguments."""
    if class_name is None:
        raise ValueError("class_name must be given")
    cls = get_obj_by_name(class_name)
    if not isinstance(cls, type):
        raise TypeError(f"{class_name!r} is not a class")
    return cls(*args, **kwargs)


# ---------------------------------------------------------------------------
# Parsing and formatting

_INT_RE = re.compile(r"[+-]?\d+")
_RANGE_RE = re.compile(r"(\d+)\s*-\s*(\d+)")


def parse_int_list(s):
    """Parse '0-3,7' into [0, 1, 2, 3, 7]. Ranges are inclusive; ints and
    lists/tuples pass through; '' gives []."""
    if isinstance(s, bool):
        raise TypeError("expected an int list, got a bool")
    if isinstance(s, int):
        return [s]
    if isinstance(s, (list, tuple)):
        return list(s)
    if not isinstance(s, str):
        raise TypeError(f"expected str, int or list, got {type(s).__name__}")
    result = []
    for token in s.split(","):
        token = token.strip()
        if not token:
            continue  # tolerate '' and trailing commas
        if _INT_RE.fullmatch(token):
            result.append(int(token))
            continue
        match = _RANGE_RE.fullmatch(token)
        if not match or int(match.group(1)) > int(match.group(2)):
            raise ValueError(f"invalid integer or range {token!r} in {s!r}")
        result.extend(range(int(match.group(1)), int(match.group(2)) + 1))
    return result


parse_range = parse_int_list


def format_time(seconds):
    """Compact human-readable duration: '12s', '3m 04s', '2h 05m', '1d 03h'."""
    s = max(int(round(float(seconds))), 0)
    if s < 60:
        return f"{s}s"
    if s < 60 * 60:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 24 * 60 * 60:
        return f"{s // 3600}h {s // 60 % 60:02d}m"
    return f"{s // 86400}d {s // 3600 % 24:02d}h"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` to write to; rename it to `path` when the block
    succeeds, delete it when it fails. Readers never see a half-written file, an interrupted
    write never destroys the previous one, and a full disk leaves nothing behind. (A kill -9
    can leave the temporary `PATH.tmp-PID-XXXXXXXX`; the training loops remove those of dead
    processes.)"""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """Progress lines with a count and an ETA for long work:
    'what: 30/100 (30%), 12s elapsed, about 28s left'. The first and the last update always
    print; the others at most every `interval` seconds, so logs stay short."""

    def __init__(self, total, what, echo=print, interval=5.0):
        self.total, self.what, self.echo, self.interval = max(int(total), 1), what, echo, interval
        self.start = time.time()
        self.last = None

    def update(self, done):
        now = time.time()
        if done < self.total and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        line = f"{self.what}: {done}/{self.total} ({100 * done / self.total:.0f}%), {format_time(elapsed)} elapsed"
        if 0 < done < self.total:
            line += f", about {format_time(elapsed * (self.total - done) / done)} left"
        self.echo(line)


# ---------------------------------------------------------------------------
# Logging


class _Tee:
    """A text stream that forwards writes to an original stream and a log file."""

    def __init__(self, stream, log_file, should_flush):
        self._stream = stream
        self._log_file = log_file
        self._should_flush = should_flush

    def write(self, text):
        n = self._stream.write(text)
        if self._log_file is not None:
            self._log_file.write(text)
        if self._should_flush:
            self.flush()
        return n

    def flush(self):
        self._stream.flush()
        if self._log_file is not None:
            self._log_file.flush()

    def __getattr__(self, name):
        # isatty(), encoding, fileno() etc. behave like the wrapped stream.
        return getattr(self._stream, name)


class Logger:
    """Copy everything written to stdout/stderr into a file until closed.

    Usable as a context manager; closing restores the original streams.
    """

    def __init__(self, file_name=None, file_mode="w", should_flush=True):
        self.file = open(file_name, file_mode, encoding="utf-8") if file_name else None
        self._orig_stdout, self._orig_stderr = sys.stdout, sys.stderr
        self._stdout = _Tee(sys.stdout, self.file, should_flush)
        self._stderr = _Tee(sys.stderr, self.file, should_flush)
        sys.stdout, sys.stderr = self._stdout, self._stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def write(self, text):
        self._stdout.write(text)

    def flush(self):
        self._stdout.flush()

    def close(self):
        # Only undo our own redirection; someone may have replaced it since.
        if sys.stdout is self._stdout:
            sys.stdout = self._orig_stdout
        if sys.stderr is self._stderr:
            sys.stderr = self._orig_stderr
        if self.file is not None:
            file, self.file = self.file, None
            self._stdout._log_file = self._stderr._log_file = None
            try:
                file.flush()
            finally: # closed even when the flush fails (a full disk)
                file.close()
