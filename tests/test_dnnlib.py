"""Tests for dnnlib.util. Network tests only talk to a local server on 127.0.0.1."""

import copy
import errno
import hashlib
import http.server
import os
import pickle
import socket
import sys
import threading
import time

import pytest

import dnnlib
from dnnlib import util
from dnnlib.util import DownloadError, EasyDict
from tests.scripts import free_port

# ---------------------------------------------------------------------------
# EasyDict


def test_easydict_attribute_and_key_access_are_equivalent():
    d = EasyDict(a=1)
    d.b = 2
    d["c"] = 3
    assert d.a == d["a"] == 1
    assert d["b"] == 2 and d.c == 3
    del d.a
    assert "a" not in d
    assert dict(d) == {"b": 2, "c": 3}


def test_easydict_missing_attribute_raises_attribute_error():
    d = EasyDict()
    with pytest.raises(AttributeError):
        d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert not hasattr(d, "missing")
    assert getattr(d, "missing", 42) == 42


def test_easydict_pickle_and_deepcopy_round_trip():
    d = EasyDict(x=1, nested=EasyDict(y=[1, 2]))
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d), copy.copy(d)):
        assert type(clone) is EasyDict and clone == d
        assert type(clone.nested) is EasyDict and clone.nested.y == [1, 2]
    deep = copy.deepcopy(d)
    deep.nested.y.append(3)
    assert d.nested.y == [1, 2]
    # Pickles must reference the stable public path.
    assert b"dnnlib.util" in pickle.dumps(d, protocol=0)


def test_easydict_is_exported_once():
    assert dnnlib.EasyDict is dnnlib.util.EasyDict
    assert dnnlib.make_cache_dir_path is util.make_cache_dir_path


# ---------------------------------------------------------------------------
# Cache directory


def test_make_cache_dir_path_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path))
    assert util.make_cache_dir_path("downloads", "x") == os.path.join(str(tmp_path), "downloads", "x")


def test_make_cache_dir_path_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DNNLIB_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert util.make_cache_dir_path() == os.path.join(str(tmp_path), ".cache", "dnnlib")
    assert util.make_cache_dir_path("a") == os.path.join(str(tmp_path), ".cache", "dnnlib", "a")


def test_make_cache_dir_path_userprofile_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("DNNLIB_CACHE_DIR", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert util.make_cache_dir_path() == os.path.join(str(tmp_path), ".cache", "dnnlib")


# ---------------------------------------------------------------------------
# open_url: local files


def test_open_url_plain_path_and_file_url(tmp_path):
    path = tmp_path / "some dir" / "data.bin"
    path.parent.mkdir()
    path.write_bytes(b"payload")
    with util.open_url(str(path)) as f:
        assert f.read() == b"payload"
    assert util.open_url(str(path), return_filename=True) == str(path)
    url = path.as_uri()  # file:///.../some%20dir/data.bin
    assert "%20" in url
    with util.open_url(url) as f:
        assert f.read() == b"payload"
    assert util.open_url(url, return_filename=True) == str(path)
    assert util.open_url("file://localhost" + url[len("file://"):], return_filename=True) == str(path)


def test_open_url_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.pkl")
    for kwargs in ({}, {"return_filename": True}):
        with pytest.raises(FileNotFoundError, match="nope.pkl"):
            util.open_url(missing, **kwargs)
        with pytest.raises(FileNotFoundError, match="nope.pkl"):
            util.open_url("file://" + missing, **kwargs)


def test_open_url_unsupported_scheme():
    with pytest.raises(ValueError, match="ftp://example.com/x"):
        util.open_url("ftp://example.com/x")


def test_is_url():
    assert util.is_url("https://example.com/a.pkl")
    assert not util.is_url("/tmp/a.pkl")
    assert not util.is_url("file:///tmp/a.pkl")
    assert util.is_url("file:///tmp/a.pkl", allow_file_urls=True)
    assert not util.is_url(None)


# ---------------------------------------------------------------------------
# open_url: HTTP against a local server


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests_seen = []

    def do_GET(self):
        _Handler.requests_seen.append(self.path)
        if self.path == "/truncated.bin":
            # Promise 1000 bytes, deliver 10, hang up.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def no_proxy(monkeypatch):
    # A proxy from the environment must not intercept 127.0.0.1 in tests.
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setattr(util, "_RETRY_DELAY", 0.01)


@pytest.fixture
def server(tmp_path, no_proxy):
    root = tmp_path / "srv"
    root.mkdir()
    (root / "model weights.pkl").write_bytes(b"weights" * 1000)
    _Handler.requests_seen = []
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    stopped = []

    def stop():
        if not stopped:
            stopped.append(True)
            httpd.shutdown()
            httpd.server_close()

    yield base, stop
    stop()


def test_http_download_is_cached_and_reused_offline(server, tmp_path):
    base, stop = server
    cache = tmp_path / "cache"
    url = base + "/model%20weights.pkl"
    with util.open_url(url, cache_dir=str(cache), verbose=False) as f:
        assert f.read() == b"weights" * 1000
    md5 = hashlib.md5(url.encode()).hexdigest()
    assert os.listdir(cache) == [f"{md5}_model_weights.pkl"]
    assert len(_Handler.requests_seen) == 1

    stop()  # From now on any network attempt would fail.
    with util.open_url(url, cache_dir=str(cache), verbose=False) as f:
        assert f.read() == b"weights" * 1000
    assert util.open_url(url, cache_dir=str(cache), return_filename=True) == str(cache / f"{md5}_model_weights.pkl")


def test_http_default_cache_dir_uses_env(server, tmp_path, monkeypatch):
    base, _ = server
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "c"))
    path = util.open_url(base + "/model%20weights.pkl", return_filename=True, verbose=False)
    assert os.path.dirname(path) == str(tmp_path / "c" / "downloads")


def test_http_cache_false_returns_bytes_without_writing(server, tmp_path):
    base, _ = server
    cache = tmp_path / "cache"
    f = util.open_url(base + "/model%20weights.pkl", cache_dir=str(cache), cache=False, verbose=False)
    assert f.read() == b"weights" * 1000
    assert not cache.exists()
    with pytest.raises(ValueError):
        util.open_url(base + "/x", cache=False, return_filename=True)


def test_http_404_raises_one_line_download_error_quickly(server, tmp_path):
    base, _ = server
    url = base + "/missing.pkl"
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path / "c"), num_attempts=2, verbose=False)
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert url in message and "404" in message and "\n" not in message
    assert isinstance(info.value, OSError)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert _Handler.requests_seen == ["/missing.pkl"]  # 4xx is not retried
    assert not os.listdir(tmp_path / "c")


def test_closed_port_raises_download_error(no_proxy, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/x.pkl"
    with pytest.raises(DownloadError, match="connection refused") as info:
        util.open_url(url, cache_dir=str(tmp_path / "c"), num_attempts=2)
    assert url in str(info.value) and "\n" not in str(info.value)
    err = capsys.readouterr().err
    assert err.strip() == f"Downloading {url} ... failed"


def test_interrupted_download_leaves_no_partial_file(server, tmp_path):
    base, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="truncated.bin") as info:
        util.open_url(base + "/truncated.bin", cache_dir=str(cache), num_attempts=2, verbose=False)
    assert "\n" not in str(info.value)
    assert _Handler.requests_seen == ["/truncated.bin"] * 2  # dropped body is retried
    assert os.listdir(cache) == []


def _wrapped(root):
    # Mimic how requests nests the root cause: ConnectionError(MaxRetryError) <- cause.
    import requests
    inner = RuntimeError("max retries")
    inner.__cause__ = root
    return requests.ConnectionError(inner)


@pytest.mark.parametrize("root, reason, retryable", [
    (socket.gaierror(-3, "Temporary failure in name resolution"), "could not resolve host (offline?)", False),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable (offline?)", False),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection refused", True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "connection reset", True),
])
def test_failure_explanations(root, reason, retryable):
    assert util._explain_failure(_wrapped(root)) == (reason, retryable)


def test_download_error_pickles():
    err = DownloadError("could not download u: r", url="u", reason="r")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and clone.url == "u" and clone.reason == "r"


def test_gdrive_confirm_url_parsing():
    url = "https://drive.google.com/uc?id=abc&export=download"
    form_page = (
        '<html><form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
        '<input type="hidden" name="id" value="abc"><input type="hidden" name="confirm" value="t">'
        '<input type="hidden" value="u-1" name="uuid"><input type="submit" value="Download anyway"></form></html>'
    )
    got = util._gdrive_confirm_url(url, form_page, {})
    assert got == "https://drive.usercontent.google.com/download?id=abc&confirm=t&uuid=u-1"
    assert util._gdrive_confirm_url(url, "", {"download_warning_1": "tok"}).endswith("&confirm=tok")
    link_page = '<a href="/uc?export=download&amp;confirm=xyz&amp;id=abc">go</a>'
    assert util._gdrive_confirm_url(url, link_page, {}) == \
        "https://drive.google.com/uc?export=download&confirm=xyz&id=abc"
    assert util._gdrive_confirm_url(url, "<html>Quota exceeded</html>", {}) is None


# ---------------------------------------------------------------------------
# Name-based lookup


def test_get_module_and_obj_by_name():
    module, rest = util.get_module_from_obj_name("dnnlib.util.EasyDict")
    assert module is util and rest == "EasyDict"
    assert util.get_obj_by_name("dnnlib.util.EasyDict") is EasyDict
    assert util.get_obj_by_name("os.path.join") is os.path.join
    assert util.get_obj_by_name("dnnlib.util") is util
    assert util.get_obj_by_name("dnnlib.util.EasyDict.__getattr__") is EasyDict.__getattr__


def test_get_obj_by_name_errors_name_the_object():
    with pytest.raises(AttributeError, match="dnnlib.util.no_such_thing"):
        util.get_obj_by_name("dnnlib.util.no_such_thing")
    with pytest.raises(ImportError, match="no_such_pkg_qq.thing"):
        util.get_obj_by_name("no_such_pkg_qq.thing")


def test_missing_dependency_inside_module_is_not_masked(tmp_path, monkeypatch):
    (tmp_path / "dnnlib_test_broken_mod.py").write_text("import no_such_dependency_qq\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_qq"):
        util.get_obj_by_name("dnnlib_test_broken_mod.X")
    sys.modules.pop("dnnlib_test_broken_mod", None)


def test_call_and_construct_by_name():
    assert util.call_func_by_name(16, func_name="math.sqrt") == 4.0
    d = util.construct_class_by_name(class_name="dnnlib.util.EasyDict", a=1)
    assert type(d) is EasyDict and d.a == 1
    with pytest.raises(ValueError):
        util.call_func_by_name(1)
    with pytest.raises(ValueError):
        util.construct_class_by_name()
    with pytest.raises(TypeError, match="math.pi"):
        util.call_func_by_name(func_name="math.pi")
    with pytest.raises(TypeError, match="math.sqrt"):
        util.construct_class_by_name(4, class_name="math.sqrt")


# ---------------------------------------------------------------------------
# Parsing and formatting


def test_parse_int_list():
    assert util.parse_int_list("0-3,7") == [0, 1, 2, 3, 7]
    assert util.parse_int_list("0-63,70") == list(range(64)) + [70]
    assert util.parse_int_list(" 5 , 2-2 ,") == [5, 2]
    assert util.parse_int_list("") == []
    assert util.parse_int_list(3) == [3]
    assert util.parse_int_list([1, 2]) == [1, 2]
    assert util.parse_range is util.parse_int_list


@pytest.mark.parametrize("bad", ["3-a", "5-2", "x", "1,2-", "1.5"])
def test_parse_int_list_rejects_junk_naming_token(bad):
    token = bad.split(",")[-1]
    with pytest.raises(ValueError, match=token.replace(".", r"\.")):
        util.parse_int_list(bad)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (12, "12s"), (12.4, "12s"), (59.6, "1m 00s"), (184, "3m 04s"),
    (2 * 3600 + 5 * 60 + 10, "2h 05m"), (27 * 3600 + 60, "1d 03h"), (-3, "0s"),
])
def test_format_time(seconds, text):
    assert util.format_time(seconds) == text


# ---------------------------------------------------------------------------
# Logger


def test_logger_tees_and_restores(tmp_path):
    log = tmp_path / "log.txt"
    before_out, before_err = sys.stdout, sys.stderr
    with util.Logger(str(log)):
        print("to stdout")
        print("to stderr", file=sys.stderr)
    assert sys.stdout is before_out and sys.stderr is before_err
    assert log.read_text() == "to stdout\nto stderr\n"
