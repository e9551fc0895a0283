"""What one client can make a real `gradcam-server` hold or do, and how the server starts.

Each test pins one behaviour an operator relies on: the event loop stays free while heatmaps are
made, responses are bounded before the model runs, augmented variants are bounded, abandoned work
stops, overload is refused before anything is decoded, declared sizes cannot overflow, a graph
without a backward rule still serves inference, start-up failures are one line, and the token can
stay off the command line. The repository:

=============  ===================================================================================
``lite0``      the shipped EfficientNet-Lite0 (symbolic links to its files)
``tiny``       a small CNN with a dynamic batch
``slow``       a slow CNN (about a quarter of a second per image), max_batch_size 16
``full``       a slower CNN (about a second per image), max_batch_size 1 and max_queue_size 1:
               two requests fill it
``norule``     a graph whose gradient path goes through Det, which has no backward rule
=============  ===================================================================================
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

import servers
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc
from servers import ServerProcess, expect_error, sample, serving
from test_server import image_input, outputs, png_bomb, tensor_input

LITE0 = "lite0"
CALL_TIMEOUT_S = 60.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMIT_MIB = 63  # the response limit: gRPC's 64 MiB message less 1 MiB for everything else


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits-repository")
    servers.link_lite0(root / LITE0)
    servers.export_torch(servers.tiny_cnn(), servers.TINY_SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=True)
    servers.export_torch(servers.slow_cnn(), servers.SLOW_SIZE, root / "slow" / "model.onnx",
                         dynamic_batch=True)
    # About a second per image: the two requests that fill it must be seen in flight together
    servers.export_torch(servers.slow_cnn(depth=96), servers.SLOW_SIZE,
                         root / "full" / "model.onnx", dynamic_batch=True)
    servers.write_config(root / "slow", max_batch_size=16)
    servers.write_config(root / "full", max_batch_size=1, max_queue_size=1)
    servers.norule_model(root / "norule" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory):
    """``start(repository, *args) -> ServerProcess``, SERVING; every one stopped at the end."""
    with contextlib.ExitStack() as started:

        def start(repository: Path, *args: str) -> ServerProcess:
            log = tmp_path_factory.mktemp("log") / "server.log"
            return started.enter_context(serving(repository, log, *args))

        yield start


@pytest.fixture(scope="module")
def server(repository: Path, start_server) -> ServerProcess:
    return start_server(repository, "--max-variants", "2")


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
    ) as channel:
        yield channel


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    client = triton.InferenceServerClient(server.address)
    yield client
    client.close()


def smooth_png(width: int, height: int) -> bytes:
    """A gradient picture: large in pixels, small in bytes."""
    row = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.repeat(np.stack([row] * 3, axis=-1)[None], height, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def slow_rows(rows: int) -> list[triton.InferInput]:
    size = servers.SLOW_SIZE
    return [tensor_input("input", np.ones((rows, 3, size, size), np.float32))]


def process_status(server: ServerProcess, field: str) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(server: ServerProcess) -> float:
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- the event loop and the response size --------------------------------------------------------


def test_health_answers_at_once_while_large_heatmaps_are_made(server, channel) -> None:
    stub = pb_grpc.GradCamStub(channel)
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(encoded=smooth_png(2000, 2000))],
                                target=pb.Target(top_k=3))
    # Health on a connection of its own, as a load balancer has: not behind the heatmaps' bytes.
    own = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
    health = health_pb2_grpc.HealthStub(own)
    latencies = []
    with own, concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stub.Explain, request, timeout=CALL_TIMEOUT_S) for _ in range(4)]
        while not all(f.done() for f in running):
            started = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        for future in running:
            heatmaps = future.result().explanations[0].heatmaps
            assert [(h.width, h.height) for h in heatmaps] == [(2000, 2000)] * 3
    # Before the heavy steps left the event loop, the same load stalled health for 2 to 6 s.
    assert len(latencies) >= 5, latencies
    assert np.median(latencies) < 0.1 and max(latencies) < 1.5, sorted(latencies)[-3:]


def test_a_response_over_the_limit_is_refused_before_the_model_runs(server, channel) -> None:
    stub = pb_grpc.GradCamStub(channel)
    image = pb.Image(encoded=smooth_png(2000, 2000))
    before = sample(server.metrics(), "gradcam_batch_size_count", model=LITE0, graph="gradcam")
    message = expect_error(
        lambda: stub.Explain(pb.ExplainRequest(model=LITE0, images=[image],
                                               target=pb.Target(top_k=20)),
                             timeout=CALL_TIMEOUT_S),
        INVALID, "305.2 MiB", f"limit of {LIMIT_MIB} MiB", "heatmap_size",
    )
    assert "model" in message
    after = sample(server.metrics(), "gradcam_batch_size_count", model=LITE0, graph="gradcam")
    assert after == before  # refused before the model ran

    small = stub.Explain(
        pb.ExplainRequest(model=LITE0, images=[image], target=pb.Target(top_k=20),
                          options=pb.ExplainOptions(heatmap_size="model")),
        timeout=CALL_TIMEOUT_S,
    )
    assert [(h.width, h.height) for h in small.explanations[0].heatmaps] == [(224, 224)] * 20


def test_kserve_heatmap_size_parameter(client) -> None:
    many = [image_input(*[smooth_png(2000, 2000)] * 8)]
    expect_error(
        lambda: client.infer(LITE0, many, outputs=outputs("heatmap"),
                             client_timeout=CALL_TIMEOUT_S),
        INVALID, "122.1 MiB", f"limit of {LIMIT_MIB} MiB",
    )
    for size, shape in (("model", (8, 224, 224)), ("64x48", (8, 48, 64))):
        result = client.infer(LITE0, many, outputs=outputs("heatmap"),
                              parameters={"heatmap_size": size}, client_timeout=CALL_TIMEOUT_S)
        heatmap = result.as_numpy("heatmap")
        assert heatmap.shape == shape and 0 <= heatmap.min() and heatmap.max() <= 1
    for bad, fragment in (("huge", "WIDTHxHEIGHT"), ("0x10", "WIDTHxHEIGHT"),
                          ("99999x99999", "over the limit")):
        expect_error(
            lambda: client.infer(LITE0, many, outputs=outputs("heatmap"),
                                 parameters={"heatmap_size": bad}, client_timeout=CALL_TIMEOUT_S),
            INVALID, fragment,
        )


# -- bounded variants ----------------------------------------------------------------------------


def test_augmented_variants_and_threads_stay_bounded(server, client) -> None:
    x = [tensor_input("input", np.ones((1, 3, 32, 32), np.float32))]
    first = client.infer("tiny", x, outputs=outputs("heatmap"), client_timeout=CALL_TIMEOUT_S)
    methods = ("gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "gradcam-elementwise")
    threads = []
    for eigen_smooth in (False, True):  # 12 variants each round
        for counterfactual in (False, True):
            for method in methods:
                client.infer("tiny", x, outputs=outputs("heatmap"), client_timeout=CALL_TIMEOUT_S,
                             parameters={"method": method, "counterfactual": counterfactual,
                                         "eigen_smooth": eigen_smooth})
        threads.append(process_status(server, "Threads"))
        held = sample(server.metrics(), "gradcam_explain_graphs", model="tiny")
        assert held == 3  # --max-variants 2, beside the default
    assert threads[1] <= threads[0] + 1  # a thread per variant before the pools were shared
    again = client.infer("tiny", x, outputs=outputs("heatmap"), client_timeout=CALL_TIMEOUT_S)
    np.testing.assert_array_equal(again.as_numpy("heatmap"), first.as_numpy("heatmap"))
    rebuilt = client.infer("tiny", x, outputs=outputs("heatmap"), client_timeout=CALL_TIMEOUT_S,
                           parameters={"method": "gradcam++"})  # evicted, built again
    assert rebuilt.as_numpy("heatmap").shape == (1, 32, 32)


# -- abandoned work ------------------------------------------------------------------------------


def stopped_batches(server: ServerProcess) -> float:
    return sample(server.metrics(), "gradcam_batches_stopped_total", model="slow", graph="gradcam")


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def assert_idle_soon(server: ServerProcess) -> None:
    """The server's CPU time grows by at most a tenth of a core-second over half a second,
    within two seconds."""

    def idle() -> bool:
        before = cpu_seconds(server)
        time.sleep(0.5)
        return cpu_seconds(server) - before < 0.1

    assert wait_for(idle, timeout=2.0)


def test_a_request_past_its_deadline_stops_its_run(server, client) -> None:
    before = stopped_batches(server)
    started = time.monotonic()
    expect_error(lambda: client.infer("slow", slow_rows(16), client_timeout=0.5),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    assert wait_for(lambda: stopped_batches(server) == before + 1)
    assert_idle_soon(server)
    assert time.monotonic() - started < 3.0  # the run alone takes about 4 s


def test_a_cancelled_request_stops_its_run(server, channel) -> None:
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    size = servers.SLOW_SIZE
    request = kserve_pb.ModelInferRequest(
        model_name="slow",
        inputs=[kserve_pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=[16, 3, size, size])],
        raw_input_contents=[np.ones((16, 3, size, size), np.float32).tobytes()],
    )
    before = stopped_batches(server)
    call = stub.ModelInfer.future(request, timeout=CALL_TIMEOUT_S)
    time.sleep(0.5)
    call.cancel()
    assert wait_for(lambda: stopped_batches(server) == before + 1)
    assert_idle_soon(server)


# -- overload and declared sizes -----------------------------------------------------------------


def _fill_the_full_model(server, client, pool, attempts: int = 5) -> list:
    """Two slow requests holding the model's two places (one running, one queued), seen in
    flight together. They are sent one after the other: sent at once, the second can find the
    first still queued and be refused (its queue holds one). On a loaded machine one may still
    end, or be refused, before both are seen: then both are let finish and sent again."""
    def send():
        return pool.submit(client.infer, "full", slow_rows(1), client_timeout=CALL_TIMEOUT_S)

    def in_progress() -> float:
        return sample(server.metrics(), "gradcam_requests_in_progress", model="full")

    for _ in range(attempts):
        busy = [send()]
        waited = time.monotonic() + CALL_TIMEOUT_S
        while in_progress() < 1 and not busy[0].done() and time.monotonic() < waited:
            time.sleep(0.01)
        time.sleep(0.1)  # the first leaves the queue for its run
        busy.append(send())
        while time.monotonic() < waited and not any(f.done() for f in busy):
            if in_progress() >= 2:
                return busy
            time.sleep(0.01)
        for future in busy:
            error = future.exception()
            if error is not None and "queue is full" not in str(error):
                raise error
    pytest.fail(f"two requests for 'full' were never in flight together in {attempts} tries")


def test_a_full_model_refuses_before_decoding(server, client) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = _fill_the_full_model(server, client, pool)
        started = time.monotonic()
        # Undecodable bytes: refused for the full queue, never looked at.
        expect_error(
            lambda: client.infer("full", [image_input(b"not an image")],
                                 client_timeout=CALL_TIMEOUT_S),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full",
        )
        assert time.monotonic() - started < 0.5
        for future in busy:
            assert future.result().as_numpy("heatmap").shape == (1, 256, 256)
    assert sample(server.metrics(), "gradcam_requests_in_progress", model="full") == 0


def kserve_request(*tensors, raw: list[bytes]) -> kserve_pb.ModelInferRequest:
    return kserve_pb.ModelInferRequest(
        model_name=LITE0,
        inputs=[kserve_pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s)
                for n, d, s in tensors],
        raw_input_contents=raw,
    )


@pytest.mark.parametrize("tensor, raw, fragments", [
    (("image", "BYTES", [10**9]), [b"\x00" * 64], ("10000000", "at most 64")),
    (("image", "BYTES", [2**62, 4]), [b""], ("too many",)),
    (("input", "FP32", [2**32, 2**32, 1, 1]), [b""], ("[4294967296, 4294967296, 1, 1]",)),
    (("input", "FP32", [-1, -2, 2]), [b""], ("negative dimension",)),
])
def test_declared_sizes_are_checked_before_use(channel, tensor, raw, fragments) -> None:
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    started = time.monotonic()
    expect_error(lambda: stub.ModelInfer(kserve_request(tensor, raw=raw), timeout=CALL_TIMEOUT_S),
                 INVALID, *fragments)
    assert time.monotonic() - started < 1.0


def test_typed_tensor_shapes_cannot_overflow(channel) -> None:
    stub = pb_grpc.GradCamStub(channel)
    huge = pb.Tensor(shape=[2**32, 2**32, 3], data=b"")
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(tensor=huge)])
    expect_error(lambda: stub.Explain(request, timeout=CALL_TIMEOUT_S),
                 INVALID, "image 0", "too many")


# -- a graph that cannot be explained ------------------------------------------------------------


def test_a_graph_without_a_backward_rule_serves_plain_inference(repository, client, channel):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    result = client.infer("norule", [tensor_input("input", x)], outputs=outputs("logits"),
                          client_timeout=CALL_TIMEOUT_S)
    session = ort.InferenceSession(str(repository / "norule" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(result.as_numpy("logits"), session.run(None, {"input": x})[0],
                               rtol=1e-5, atol=1e-6)
    expect_error(lambda: client.infer("norule", [tensor_input("input", x)],
                                      client_timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.FAILED_PRECONDITION, "inference only", "Det")
    info = pb_grpc.GradCamStub(channel).GetModelInfo(pb.GetModelInfoRequest(model="norule"),
                                                     timeout=CALL_TIMEOUT_S)
    assert "Det" in info.explain_error and not info.methods and not info.layer


# -- start-up ------------------------------------------------------------------------------------


def start_failure(repository: Path, *args: str, env: dict | None = None) -> str:
    """Start a server that must fail: returns its stderr, after checking exit status 2 and a
    single line."""
    result = subprocess.run(
        [sys.executable, "-m", "gradcam_server", "--model-repository", str(repository), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradcam-server: ") and "Traceback" not in result.stderr
    return lines[0]


def test_start_up_failures_are_one_line(server, repository, tmp_path) -> None:
    metrics_port = server.metrics_url.split(":")[2].split("/")[0]
    line = start_failure(repository, "--port", str(server.port), "--metrics-port", "-1")
    assert f"port {server.port}" in line and "already in use" in line
    line = start_failure(repository, "--port", "0", "--metrics-port", metrics_port)
    assert "metrics" in line and metrics_port in line
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("not a key")
    cert.write_bytes(servers.self_signed_server_cert().cert)
    line = start_failure(repository, "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert "key.pem" in line
    other = servers.self_signed_server_cert()
    key.write_bytes(other.key)  # a key, but not the certificate's
    line = start_failure(repository, "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert "cannot be used together" in line
    line = start_failure(tmp_path / "missing", "--port", "0")
    assert "not a directory" in line
    line = start_failure(repository, "--port", "0", "--token-file", str(tmp_path / "none"))
    assert "token file" in line


def test_token_from_a_file_or_the_environment(repository, start_server, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    tiny = tmp_path / "repository"
    tiny.mkdir()
    (tiny / "tiny").symlink_to(repository / "tiny", target_is_directory=True)
    by_file = start_server(tiny, "--token-file", str(token_file))
    os.environ["GRADCAM_TOKEN"] = "from-environment"
    try:
        by_environment = start_server(tiny)
    finally:
        del os.environ["GRADCAM_TOKEN"]
    request = pb.ListModelsRequest()
    for server, token in ((by_file, "from-file"), (by_environment, "from-environment")):
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GradCamStub(channel)
            expect_error(lambda: stub.ListModels(request, timeout=CALL_TIMEOUT_S),
                         grpc.StatusCode.UNAUTHENTICATED, "bearer token")
            listed = stub.ListModels(request, timeout=CALL_TIMEOUT_S,
                                     metadata=[("authorization", f"Bearer {token}")])
            assert [m.name for m in listed.models] == ["tiny"]
        assert token not in " ".join(server.process.args)


def test_long_names_are_refused_without_being_echoed(client, channel) -> None:
    long = "x" * 1_000_000
    message = expect_error(
        lambda: client.infer(LITE0, [image_input(smooth_png(8, 8))],
                             parameters={"target_layer": long}, client_timeout=CALL_TIMEOUT_S),
        INVALID, "'target_layer'", "1000000 characters", "at most 1024",
    )
    assert len(message) < 200
    stub = pb_grpc.GradCamStub(channel)
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(encoded=smooth_png(8, 8))],
                                layers=["a", long])
    expect_error(lambda: stub.Explain(request, timeout=CALL_TIMEOUT_S),
                 INVALID, "layers[1]", "at most 1024")
    unknown = [("u" * 2000, "FP32", [1])]
    message = expect_error(
        lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            kserve_request(*unknown, raw=[b"\x00" * 4]), timeout=CALL_TIMEOUT_S),
        INVALID, "unknown input 'uuuu", "...",
    )
    assert len(message) <= 1024


def test_input_names_are_checked_before_anything_is_decoded(channel) -> None:
    many = [(f"extra{i}", "FP32", [1, 3, 224, 224]) for i in range(2000)]
    raw = [b"\x00" * (4 * 3 * 224 * 224)] * 2000  # 1.2 GB declared; not one byte looked at
    started = time.monotonic()
    request = kserve_request(*many[:40], raw=raw[:40])
    expect_error(lambda: kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        request, timeout=CALL_TIMEOUT_S), INVALID, "unknown input 'extra0'")
    assert time.monotonic() - started < 2.0


def test_the_response_bound_is_checked_from_the_image_header(client, channel) -> None:
    # A 7000 x 7000 header over a few bytes of pixel data: checked before decoding, the
    # response's size is the error, not the missing pixels.
    header_only = png_bomb(7000, 7000)
    expect_error(lambda: client.infer(LITE0, [image_input(header_only)],
                                      client_timeout=CALL_TIMEOUT_S),
                 INVALID, "186.9 MiB", f"limit of {LIMIT_MIB} MiB")
    stub = pb_grpc.GradCamStub(channel)
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(encoded=header_only)])
    expect_error(lambda: stub.Explain(request, timeout=CALL_TIMEOUT_S),
                 INVALID, "186.9 MiB", f"limit of {LIMIT_MIB} MiB")
    expect_error(lambda: client.infer(LITE0, [image_input(header_only, smooth_png(8, 8))],
                                      client_timeout=CALL_TIMEOUT_S),
                 INVALID, "one pixel size")


def test_pixel_level_methods_return_their_signed_gradients(client, channel) -> None:
    """The guided gradients come back as they are in the graph: KServe's pixel_map output and
    the typed API's Heatmap.pixel_gradients, whose per-pixel max |value| is the heatmap."""
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    parameters = {"method": "guided-backprop"}
    result = client.infer(LITE0, [tensor_input("input", x)],
                          outputs=outputs("heatmap", "pixel_map"), parameters=parameters,
                          client_timeout=CALL_TIMEOUT_S)
    pixel_map, heatmap = result.as_numpy("pixel_map"), result.as_numpy("heatmap")
    assert pixel_map.shape == (1, 3, 224, 224) and (pixel_map < 0).any() and (pixel_map > 0).any()
    magnitude = np.abs(pixel_map).max(axis=1)
    low, high = magnitude.min(), magnitude.max()  # min-max normalised, as every map
    np.testing.assert_allclose(heatmap, (magnitude - low) / (high - low), atol=1e-5)

    stub = pb_grpc.GradCamStub(channel)
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(tensor=pb.Tensor(
        shape=[3, 224, 224], data=x[0].tobytes()))], method=pb.METHOD_GUIDED_BACKPROP)
    typed = stub.Explain(request, timeout=CALL_TIMEOUT_S).explanations[0].heatmaps[0]
    gradients = np.frombuffer(typed.pixel_gradients.data, "<f4").reshape(
        typed.pixel_gradients.shape)
    np.testing.assert_allclose(gradients, pixel_map[0], rtol=1e-5, atol=1e-7)
    plain = stub.Explain(pb.ExplainRequest(model=LITE0, images=request.images),
                         timeout=CALL_TIMEOUT_S).explanations[0].heatmaps[0]
    assert not plain.HasField("pixel_gradients")
    expect_error(lambda: client.infer(LITE0, [tensor_input("input", x)],
                                      outputs=outputs("pixel_map"), client_timeout=CALL_TIMEOUT_S),
                 INVALID, "'pixel_map'", "pixel-level methods")


def test_dff_returns_its_concept_scores_over_kserve(client, channel) -> None:
    """KServe's concept_scores output holds what the typed API's Heatmap.concept_scores holds
    for the same image: each concept's score for the class, the heatmap being the map of the
    concept scoring highest; any other method refuses it by name."""
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    result = client.infer(LITE0, [tensor_input("input", x)],
                          outputs=outputs("heatmap", "concept_scores"),
                          parameters={"method": "dff"}, client_timeout=CALL_TIMEOUT_S)
    scores = result.as_numpy("concept_scores")
    assert scores.shape == (1, 5) and np.isfinite(scores).all() and (scores >= 0).all()
    stub = pb_grpc.GradCamStub(channel)
    request = pb.ExplainRequest(model=LITE0, images=[pb.Image(tensor=pb.Tensor(
        shape=[3, 224, 224], data=x[0].tobytes()))], method=pb.METHOD_DFF)
    typed = stub.Explain(request, timeout=CALL_TIMEOUT_S).explanations[0].heatmaps[0]
    np.testing.assert_allclose(typed.concept_scores, scores[0], rtol=1e-5)
    expect_error(lambda: client.infer(LITE0, [tensor_input("input", x)],
                                      outputs=outputs("concept_scores"),
                                      client_timeout=CALL_TIMEOUT_S),
                 INVALID, "'concept_scores'", "'dff' only")
