"""HTTP mode's translation and guard rails without a model: the OpenAI and A1111 mappings, and
the app's answers to hostile requests, with a stand-in service (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from worker.errors import InputError
from worker.frontdoor import a1111, openai_images
from worker.frontdoor.app import MAX_BODY_BYTES, Backend, create_app
from worker.service import Outcome

OUTPUT = {"images": [{"image": "data:image/png;base64,AAAA", "seed": 5},
                     {"image": None, "seed": 6}],
          "parameters": {"prompt": "p", "negative_prompt": None, "width": 512, "height": 512,
                         "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 5,
                         "scheduler": "K_EULER", "strength": None, "output_format": "png",
                         "checkpoint": "sdxl_lightning_4step_unet.safetensors"}}


@dataclass
class StandIn:
    """What the app needs of ``Service``: records each call, answers ``reply``."""

    reply: dict[str, Any] = field(default_factory=lambda: dict(OUTPUT))
    kind: str = "done"
    calls: list[tuple[Any, str, bool]] = field(default_factory=list)
    delivery: Any = field(default_factory=lambda: SimpleNamespace(bucket=None))
    engine: Any = field(default_factory=lambda: SimpleNamespace(steps=(4,)))

    async def run(self, job_input: Any, s3_config: Any, job_id: str, on_step: Any = None, *,
                  inline: bool = False) -> Outcome:
        self.calls.append((job_input, job_id, inline))
        return Outcome(self.kind, self.reply)


@pytest.fixture
def service() -> StandIn:
    return StandIn()


@pytest.fixture
def client(service: StandIn) -> TestClient:
    return TestClient(create_app(Backend(service=service, max_running=2, max_waiting=2)))


class TestOpenAIMapping:
    def test_fields_map_to_ours(self) -> None:
        job, fmt, warnings = openai_images.generation_input(
            {"prompt": "a fox", "n": 2, "size": "768x512", "quality": "high",
             "output_format": "webp", "output_compression": 0, "user": "u1", "seed": 3}, False)
        assert job == {"prompt": "a fox", "num_images": 2, "width": 768, "height": 512,
                       "num_inference_steps": 8, "output_format": "webp", "quality": 1,
                       "seed": 3}
        assert fmt == "b64_json" and warnings == [
            "quality high runs the 8-step checkpoint (or the nearest one loaded)"]

    @pytest.mark.parametrize(("body", "param"), [
        ({"prompt": "p", "n": 9}, "n"), ({"prompt": "p", "n": "2"}, "n"),
        ({"prompt": "p", "size": 1024}, "size"), ({"prompt": "p", "size": "big"}, "size"),
        ({"prompt": "p", "quality": []}, "quality"), ({"prompt": "p", "quality": "ultra"},
                                                     "quality"),
        ({"prompt": "p", "background": "transparent"}, "background"),
        ({"prompt": "p", "response_format": "url"}, "response_format"),
        ({"prompt": "p", "stream": True}, "stream"),
        ({"prompt": "p", "output_compression": 101}, "output_compression")])
    def test_bad_values_name_their_param(self, body: dict[str, Any], param: str) -> None:
        with pytest.raises(openai_images.OpenAIFieldError) as caught:
            openai_images.generation_input(body, has_bucket=False)
        assert caught.value.param == param and str(caught.value).startswith("invalid input")

    def test_quality_beside_explicit_steps_is_reported_not_silently_dropped(self) -> None:
        job, _, warnings = openai_images.generation_input(
            {"prompt": "p", "quality": "low", "num_inference_steps": 4}, False)
        assert job["num_inference_steps"] == 4
        assert warnings == ["quality low was ignored: num_inference_steps is set"]

    def test_form_scalars_are_read_as_json_and_deep_ones_stay_text(self) -> None:
        deep = "[" * 5000 + "]" * 5000
        job, _, _ = openai_images.edit_input({"prompt": "p", "n": "2", "seed": deep},
                                             [b"img"], None, False)
        assert job["num_images"] == 2 and job["seed"] == deep  # then schemas refuses it

    def test_models_name_the_operators_own_model(self) -> None:
        assert [m["id"] for m in openai_images.models_list()["data"]] == [
            "ByteDance/SDXL-Lightning"]
        served = {4: ("juggernaut.safetensors sha256:ab12", "lora 4-step"),
                  8: ("juggernaut.safetensors sha256:ab12", "lora 8-step")}
        assert [m["id"] for m in openai_images.models_list(served)["data"]] == [
            "juggernaut.safetensors sha256:ab12"]

    def test_withheld_images_are_left_out_with_a_warning(self) -> None:
        body, withheld = openai_images.images_response(OUTPUT, "b64_json", created=1)
        assert body["data"] == [{"b64_json": "AAAA"}]
        assert withheld == ["image with seed 6 was withheld by the safety checker"]
        with pytest.raises(openai_images.OpenAIFieldError, match="content_policy_violation"):
            openai_images.images_response({**OUTPUT, "images": [OUTPUT["images"][1]]}, "url")


class TestA1111Mapping:
    def test_seed_minus_one_is_random_and_others_pass_through_to_our_rules(self) -> None:
        assert "seed" not in a1111.job_input({"prompt": "p", "seed": -1}, "txt2img")[0]
        assert a1111.job_input({"prompt": "p", "seed": 2**32}, "txt2img")[0]["seed"] == 2**32

    def test_batches_count_and_txt2img_ignores_denoising_strength(self) -> None:
        job, _ = a1111.job_input({"prompt": "p", "batch_size": 2, "n_iter": 2,
                                  "denoising_strength": 0.7}, "txt2img")
        assert job["num_images"] == 4 and "strength" not in job
        with pytest.raises(InputError, match="batch_size 3 x n_iter 2 = 6 images"):
            a1111.job_input({"prompt": "p", "batch_size": 3, "n_iter": 2}, "txt2img")

    @pytest.mark.parametrize(("sampler", "schedule", "ours"), [
        ("Euler a", None, "K_EULER_ANCESTRAL"), ("DPM++ 2M", "karras", "KarrasDPM"),
        ("k_dpmpp_2m_sde", "automatic", "DPM++2MSDE"), ("plms", "sgm_uniform", "PNDM")])
    def test_sampler_names(self, sampler: str, schedule: str | None, ours: str) -> None:
        body = {"prompt": "p", "sampler_name": sampler, "scheduler": schedule}
        assert a1111.job_input(body, "txt2img")[0]["scheduler"] == ours

    def test_features_not_run_are_warnings_plumbing_is_silent(self) -> None:
        _, warnings = a1111.job_input({"prompt": "p", "enable_hr": True, "eta": 0.3,
                                       "send_images": True}, "txt2img")
        assert warnings == ["enable_hr was ignored: this worker does not run it"]

    def test_withheld_images_are_left_out_with_a_warning(self) -> None:
        answer = a1111.images_response({"prompt": "p"}, OUTPUT, [])
        info = json.loads(answer["info"])
        assert answer["images"] == ["AAAA"] and info["all_seeds"] == [5]
        assert info["warnings"] == ["image with seed 6 was withheld by the safety checker"]


class TestHostileRequests:
    def test_a_stream_that_is_not_a_boolean_is_refused(self, client: TestClient,
                                                       service: StandIn) -> None:
        response = client.post("/v1/generate", json={"prompt": "p", "stream": "yes"})
        assert response.status_code == 400 and "stream='yes' is invalid" in \
            response.json()["error"]
        assert service.calls == []

    @pytest.mark.parametrize("body", [b"[]", b"null", b"7"])
    def test_json_that_is_not_an_object_reaches_our_validation(
            self, client: TestClient, service: StandIn, body: bytes) -> None:
        client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        assert service.calls and service.calls[0][0] == json.loads(body)

    def test_json_nested_past_pythons_limit_is_a_400(self, client: TestClient) -> None:
        response = client.post("/v1/generate", content=b"[" * 100_000 + b"]" * 100_000)
        assert response.status_code == 400
        assert response.json() == {"error": "invalid input: the body nests too deep to parse"}

    def test_a_body_over_the_payload_limit_is_413_before_it_is_read(
            self, client: TestClient) -> None:
        response = client.post("/v1/images/generations", content=b"{}",
                               headers={"content-length": str(MAX_BODY_BYTES + 1)})
        assert response.status_code == 413
        assert response.json()["error"]["message"].startswith("the request body is over")

    def test_a_body_without_a_length_is_411(self, client: TestClient) -> None:
        response = client.post("/sdapi/v1/txt2img", content=iter([b"{}"]))
        assert response.status_code == 411 and "Content-Length" in response.json()["detail"]

    def test_only_a_plain_request_id_is_used_as_the_job_id(
            self, client: TestClient, service: StandIn) -> None:
        client.post("/v1/generate", json={"prompt": "p"}, headers={"x-request-id": "ok-123"})
        client.post("/v1/generate", json={"prompt": "p"},
                    headers={"x-request-id": "a prompt\twith text"})
        assert service.calls[0][1] == "ok-123" and service.calls[1][1].startswith("http-")

    def test_base64_apis_ask_for_inline_images(self, client: TestClient,
                                               service: StandIn) -> None:
        client.post("/v1/images/generations", json={"prompt": "p"})
        client.post("/sdapi/v1/txt2img", json={"prompt": "p"})
        client.post("/v1/generate", json={"prompt": "p"})
        assert [inline for _, _, inline in service.calls] == [True, True, False]

    def test_a_failed_job_tells_the_openai_sdk_not_to_retry(self, service: StandIn) -> None:
        service.kind, service.reply = "failed", {"error": "out of GPU memory generating ..."}
        app = TestClient(create_app(Backend(service=service, max_running=1)))
        response = app.post("/v1/images/generations", json={"prompt": "p"})
        assert response.status_code == 500 and response.headers["x-should-retry"] == "false"

    def test_a_bug_on_the_gpu_turns_ping_unhealthy_and_never_leaks_the_flag(
            self, service: StandIn) -> None:
        service.kind = "internal"
        service.reply = {"error": "internal error: RuntimeError", "refresh_worker": True}
        backend = Backend(service=service, max_running=1)
        app = TestClient(create_app(backend))
        assert app.get("/ping").status_code == 200
        response = app.post("/v1/generate", json={"prompt": "p"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error: RuntimeError"}
        ping = app.get("/ping")
        assert ping.status_code == 500 and "RunPod replaces it" in ping.json()["error"]
        assert app.post("/v1/generate", json={"prompt": "p"}).status_code == 503
