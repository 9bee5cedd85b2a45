"""fetch.py against a mocked HTTP layer: the JSON simple index, resumed downloads, checksums."""

import hashlib

import pytest
import requests
import responses
from rich.console import Console

from mergeability import MergeabilityError, fetch
from mergeability.fetch import RemoteFile, download, registry_file

INDEX = "https://index.test/simple"
URL = "https://files.test/pkg-1.0-py3-none-any.whl"
DATA = bytes(range(256)) * 9000  # 2.2 MiB: more than one fetch.CHUNK
QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _index(monkeypatch):
    monkeypatch.setattr(fetch, "INDEX", INDEX)  # read from MERGEABILITY_INDEX once, at import


def remote(data=DATA) -> RemoteFile:
    return RemoteFile("pkg-1.0-py3-none-any.whl", URL, hashlib.sha256(data).hexdigest(), len(data))


def serve(rsps, bodies, gets):
    """Successive GETs of URL return bodies[0], bodies[1], … (the last repeats), honouring a Range header."""
    def callback(request):
        rng = request.headers.get("Range")
        gets.append(rng)
        body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
        start = int(rng[len("bytes="):-1]) if rng else 0
        return (206, {}, body[start:]) if start else (200, {}, body)
    rsps.add_callback(responses.GET, URL, callback=callback)


@responses.activate
def test_registry_file_reads_the_json_simple_index():
    responses.get(f"{INDEX}/pkg/", json={"meta": {"api-version": "1.1"}, "files": [
        {"filename": "pkg-1.0.tar.gz", "url": "https://files.test/pkg-1.0.tar.gz", "hashes": {"sha256": "aa"}},
        {"filename": "pkg-1.0-py3-none-any.whl", "url": URL, "hashes": {"sha256": "bb"}, "size": 12}]})
    assert registry_file("pkg", "pkg-1.0-py3-none-any.whl") == RemoteFile("pkg-1.0-py3-none-any.whl", URL, "bb", 12)
    assert responses.calls[0].request.headers["Accept"] == "application/vnd.pypi.simple.v1+json"
    with pytest.raises(MergeabilityError, match=f"pkg on {INDEX} has no file pkg-2.0.whl"):
        registry_file("pkg", "pkg-2.0.whl")


@responses.activate
def test_an_unreadable_index_is_a_one_line_error():
    responses.get(f"{INDEX}/gone/", status=404)
    responses.get(f"{INDEX}/html/", body="<html>not json</html>")
    for package in ("gone", "html"):
        with pytest.raises(MergeabilityError, match=f"cannot read the package index for {package} .*"
                                                    "set MERGEABILITY_INDEX") as e:
            registry_file(package, "x.whl")
        assert "\n" not in str(e.value)


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path):
    dest = tmp_path / "pkg.whl"
    dest.with_name("pkg.whl.part").write_bytes(DATA[:1_000_000])  # what a killed download left
    gets = []
    with responses.RequestsMock() as rsps:
        serve(rsps, [DATA], gets)
        assert download(remote(), dest, QUIET) == dest
    assert gets == ["bytes=1000000-"] and dest.read_bytes() == DATA
    assert not dest.with_name("pkg.whl.part").exists()


def test_a_server_that_ignores_the_range_restarts_the_file(tmp_path):
    dest = tmp_path / "pkg.whl"
    dest.with_name("pkg.whl.part").write_bytes(b"stale bytes")
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=DATA, status=200)  # a full 200 answer to a range request
        download(remote(), dest, QUIET)
    assert dest.read_bytes() == DATA


def test_a_bad_checksum_is_fetched_again_once(tmp_path):
    dest, gets = tmp_path / "pkg.whl", []
    with responses.RequestsMock() as rsps:
        serve(rsps, [b"x" * len(DATA), DATA], gets)
        download(remote(), dest, QUIET)
    assert gets == [None, None] and dest.read_bytes() == DATA  # the second try starts from zero
    gets.clear()
    with responses.RequestsMock() as rsps:  # there already, checksum right: no request
        download(remote(), dest, QUIET)
        assert len(rsps.calls) == 0


def test_a_checksum_that_never_matches_is_an_error_after_two_tries(tmp_path):
    dest, gets = tmp_path / "pkg.whl", []
    with responses.RequestsMock() as rsps:
        serve(rsps, [b"x" * 100], gets)
        with pytest.raises(MergeabilityError, match="pkg-1.0-py3-none-any.whl: checksum mismatch after two downloads"):
            download(remote(), dest, QUIET)
    assert len(gets) == 2 and not dest.exists() and not dest.with_name("pkg.whl.part").exists()


def test_a_failed_request_keeps_what_arrived(tmp_path):
    dest = tmp_path / "pkg.whl"
    dest.with_name("pkg.whl.part").write_bytes(DATA[:10])
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=requests.ConnectionError("connection refused"))
        with pytest.raises(MergeabilityError, match="downloading pkg-1.0-py3-none-any.whl failed: connection refused; "
                                                    "run the command again to resume"):
            download(remote(), dest, QUIET)
    assert dest.with_name("pkg.whl.part").read_bytes() == DATA[:10] and not dest.exists()

