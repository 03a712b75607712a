"""Where a job's LoRA files come from (``worker/adapters/store``) and the LRU bookkeeping of its
caches (``worker/adapters/cache``): names inside LORA_DIR only, https URLs through the SSRF-safe
fetcher from a loopback TLS server with DNS mapped in-process, one download per URL however many
jobs ask at once, least recently used files evicted and fetched again, the settings' rules
(MAX_LORAS cut, scale clamp, ALLOW_LORA_URLS) said as warnings or errors. No torch: the files are
opaque bytes here; reading them as LoRAs is the engine's (tests/integration/test_loras.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import LoraInput, parse_request
from tests.support.endpoints import Dns
from tests.support.http_fixtures import LocalServer, Network, Route, make_certificate
from worker.adapters.cache import Lru
from worker.adapters.store import LoraStore, default_lora_dir
from worker.errors import InputError
from worker.inputs.fetch import fetch

PUBLIC_IP = "93.184.216.34"  # a global address; never dialled (Network routes it locally)
HOST = "loras.example"
BODY = b"not parsed here: the engine reads the tensors" * 100


class TestLru:
    def test_the_least_recently_used_goes_first_never_the_newest(self) -> None:
        lru: Lru[str, int] = Lru(limit=10, size=lambda size: size)
        assert lru.put("a", 4) == [] and lru.put("b", 4) == []
        assert lru.get("a") == 4  # a is now the most recent
        assert lru.put("c", 4) == [("b", 4)]
        assert lru.keys() == ["a", "c"]
        assert lru.put("huge", 50) == [("a", 4), ("c", 4)]  # alone over budget, but kept
        assert lru.keys() == ["huge"]


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "pixel.safetensors").write_bytes(BODY)
    (folder / "styles" / "ink.safetensors").write_bytes(BODY + b"ink")
    (tmp_path / "outside.safetensors").write_bytes(BODY)
    return folder


def entries(*paths: str, scale: float = 1.0) -> tuple[LoraInput, ...]:
    return tuple(LoraInput(path=p, scale=scale) for p in paths)


class TestLocalFiles:
    def test_a_name_in_the_folder_resolves_with_its_sha256(self, lora_dir: Path,
                                                          tmp_path: Path) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        uses, warnings = store.resolve(entries("pixel.safetensors", "styles/ink.safetensors"))
        assert [u.path for u in uses] == ["pixel.safetensors", "styles/ink.safetensors"]
        assert uses[0].sha256 == hashlib.sha256(BODY).hexdigest() != uses[1].sha256
        assert Path(uses[1].file) == (lora_dir / "styles" / "ink.safetensors").resolve()
        assert warnings == [] and store.downloads == 0

    @pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/x.safetensors",
                                      "styles/../../outside.safetensors"])
    def test_a_name_cannot_leave_the_folder(self, lora_dir: Path, tmp_path: Path,
                                            name: str) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        with pytest.raises(InputError, match=r"loras\[0\]\.path=.* leaves the LoRA folder"):
            store.resolve(entries(name))

    def test_only_safetensors_and_existing_files(self, lora_dir: Path, tmp_path: Path) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        with pytest.raises(InputError, match=r"only \.safetensors files are accepted"):
            store.resolve(entries("pixel.ckpt"))
        with pytest.raises(InputError, match=r"no such file in the LoRA folder \(available: "
                                             r"pixel\.safetensors, styles/ink\.safetensors\)"):
            store.resolve(entries("nope.safetensors"))

    @pytest.mark.parametrize(("name", "says"), [
        ("a\x00b.safetensors", "without NUL"), ("x" * 300 + ".safetensors", "no such file"),
        ("d/" * 600 + "a.safetensors", "at most 1024 characters")])
    def test_an_unusable_name_is_the_callers_error(self, lora_dir: Path, tmp_path: Path,
                                                   name: str, says: str) -> None:
        # Found in review: NUL and over-long names raised ValueError/OSError: internal errors.
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        with pytest.raises(InputError, match=r"^invalid input: loras\[0\]\.path=") as caught:
            store.resolve(entries(name))
        assert says in str(caught.value)

    def test_the_default_folder_is_on_the_volume_when_mounted(self, tmp_path: Path) -> None:
        assert default_lora_dir(tmp_path / "model", tmp_path / "novolume") == \
            tmp_path / "model" / "loras"
        assert default_lora_dir(tmp_path / "model", tmp_path) == tmp_path / "loras"


class TestRules:
    def test_more_than_max_loras_are_cut_with_a_warning(self, lora_dir: Path,
                                                       tmp_path: Path) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache", max_loras=1)
        uses, warnings = store.resolve(entries("pixel.safetensors", "styles/ink.safetensors"))
        assert len(uses) == 1
        assert warnings == ["loras: only the first 1 of 2 were used (MAX_LORAS=1)"]
        with pytest.raises(InputError, match="MAX_LORAS=0"):
            LoraStore(lora_dir, cache_dir=tmp_path / "cache", max_loras=0).resolve(
                entries("pixel.safetensors"))

    def test_a_scale_out_of_range_is_clamped_with_a_warning(self, lora_dir: Path,
                                                           tmp_path: Path) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        uses, warnings = store.resolve(entries("pixel.safetensors", scale=9))
        assert uses[0].scale == 4.0
        assert warnings == ["loras[0].scale 9 was clamped to 4 (allowed -2 to 4)"]
        uses, warnings = store.resolve(entries("pixel.safetensors", scale=-2))
        assert uses[0].scale == -2.0 and warnings == []

    def test_urls_must_be_https_and_allowed(self, lora_dir: Path, tmp_path: Path) -> None:
        store = LoraStore(lora_dir, cache_dir=tmp_path / "cache")
        with pytest.raises(InputError, match="must be https://"):
            store.resolve(entries("http://loras.example/a.safetensors"))
        closed = LoraStore(lora_dir, cache_dir=tmp_path / "cache", allow_urls=False)
        with pytest.raises(InputError, match="ALLOW_LORA_URLS=false"):
            closed.resolve(entries("https://loras.example/a.safetensors"))

    def test_the_field_is_checked_by_the_job_contract(self) -> None:
        with pytest.raises(InputError, match=r"loras\[0\]\.scale='x' is invalid"):
            parse_request({"prompt": "p", "loras": [{"path": "a.safetensors", "scale": "x"}]})
        with pytest.raises(InputError, match=r"unknown field 'loras\[0\]\.weight': an entry of "
                                             r"loras takes path, scale"):
            parse_request({"prompt": "p", "loras": [{"path": "a.safetensors", "weight": 1}]})
        with pytest.raises(InputError, match="at most 16 items"):
            parse_request({"prompt": "p", "loras": [{"path": "a.safetensors"}] * 17})
        request = parse_request({"prompt": "p", "loras": [{"path": "a.safetensors"}]})
        assert request.loras == (LoraInput(path="a.safetensors", scale=1.0),)


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[LocalServer, ssl.SSLContext]]:
    cert, key = make_certificate(tmp_path, HOST)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with LocalServer(tls=context) as server:
        for name in ("a", "b", "c"):
            server.routes[f"/{name}.safetensors"] = Route(
                body=BODY + name.encode(), headers={"Content-Type": "application/octet-stream"})
        yield server, ssl.create_default_context(cafile=str(cert))


def url_store(https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path,
              **options: object) -> LoraStore:
    _, client = https
    fetcher = functools.partial(fetch, resolver=Dns({HOST: [PUBLIC_IP]}),
                                opener=Network(), ssl_context=client)
    return LoraStore(tmp_path / "loras", cache_dir=tmp_path / "cache", fetcher=fetcher,
                     **options)


class TestDownloads:
    def test_a_url_is_fetched_once_then_served_from_the_disk_cache(
            self, https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path,
            caplog: pytest.LogCaptureFixture) -> None:
        server, _ = https
        store = url_store(https, tmp_path)
        url = server.url("/a.safetensors?token=SECRET", HOST, "https")
        with caplog.at_level(logging.INFO):
            first, _ = store.resolve(entries(url))
            again, _ = store.resolve(entries(url))
        assert first == again and store.downloads == 1 and len(server.requests) == 1
        assert first[0].path == url
        assert first[0].sha256 == hashlib.sha256(BODY + b"a").hexdigest()
        assert Path(first[0].file).read_bytes() == BODY + b"a"
        assert "SECRET" not in caplog.text and "a.safetensors" not in caplog.text

    def test_two_jobs_asking_at_once_share_one_download(
            self, https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path) -> None:
        server, _ = https
        server.routes["/slow.safetensors"] = Route(body=BODY, delay_s=0.5)
        store = url_store(https, tmp_path)
        url = server.url("/slow.safetensors", HOST, "https")
        results: list[str] = []

        def job() -> None:
            results.append(store.resolve(entries(url))[0][0].sha256)

        threads = [threading.Thread(target=job) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(results) == 3 and len(set(results)) == 1
        assert store.downloads == 1 and len(server.requests) == 1

    def test_the_least_recently_used_file_is_evicted_and_fetched_again(
            self, https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path) -> None:
        server, _ = https
        store = url_store(https, tmp_path, cache_bytes=2.5 * len(BODY))  # room for two
        a, b, c = (server.url(f"/{n}.safetensors", HOST, "https") for n in "abc")
        for url in (a, b, a, c):  # a was used after b: b is evicted for c
            store.resolve(entries(url))
        assert store.downloads == 3
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
        store.resolve(entries(a))
        assert store.downloads == 3  # still cached
        store.resolve(entries(b))
        assert store.downloads == 4  # evicted, so fetched again

    def test_a_restarted_worker_counts_the_files_left_in_the_cache(
            self, https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path) -> None:
        server, _ = https
        store = url_store(https, tmp_path)
        for name in "abc":
            store.resolve(entries(server.url(f"/{name}.safetensors", HOST, "https")))
        url_store(https, tmp_path, cache_bytes=1.5 * len(BODY))
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def test_a_download_over_the_cap_or_not_binary_is_the_callers_error(
            self, https: tuple[LocalServer, ssl.SSLContext], tmp_path: Path) -> None:
        server, _ = https
        server.routes["/page.safetensors"] = Route(body=b"<html>",
                                                   headers={"Content-Type": "text/html"})
        store = url_store(https, tmp_path, max_bytes=len(BODY) // 2)
        with pytest.raises(InputError, match=r"loras\[0\]\.path: the LoRA could not be "
                                             r"downloaded: .*limit"):
            store.resolve(entries(server.url("/a.safetensors", HOST, "https")))
        with pytest.raises(InputError, match="text/html"):
            store.resolve(entries(server.url("/page.safetensors", HOST, "https")))
        assert list((tmp_path / "cache").glob("*")) == []

    def test_a_private_address_is_refused(self, https: tuple[LocalServer, ssl.SSLContext],
                                          tmp_path: Path) -> None:
        server, client = https
        fetcher = functools.partial(fetch, resolver=Dns({HOST: ["10.0.0.1"]}),
                                    opener=Network(), ssl_context=client)
        store = LoraStore(tmp_path / "loras", cache_dir=tmp_path / "cache", fetcher=fetcher)
        with pytest.raises(InputError, match="private address"):
            store.resolve(entries(server.url("/a.safetensors", HOST, "https")))
        assert server.requests == []
