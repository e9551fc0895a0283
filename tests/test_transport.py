"""How responses leave the server: large fields joined into one message outside the GIL, and
large messages handed to gRPC one at a time, so that the event loop answers between them."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gradcam_proto import grpc_service_pb2 as pb
from gradcam_server import transport, wire


@pytest.mark.parametrize("floats", [3, wire.GIL_FREE_JOIN_BYTES // 4 + 5])
def test_join_equals_concatenation_and_parses_as_the_message(floats: int) -> None:
    values = np.random.default_rng(0).standard_normal(floats).astype(np.float32)
    response = pb.ModelInferResponse(model_name="m", id="7")
    parts = [
        response.SerializeToString(),
        *wire.field(6, [wire.array_bytes(values)]),  # raw_output_contents
        *wire.field(6, [wire.array_bytes(np.zeros(0, np.float32))]),
        *wire.field(6, [b"", wire.array_bytes(values[::-1])]),
    ]
    joined = wire.join(parts)
    assert type(joined) is bytes
    assert joined == b"".join(parts)
    parsed = pb.ModelInferResponse.FromString(joined)
    assert (parsed.model_name, parsed.id) == ("m", "7")
    contents = [np.frombuffer(c, "<f4") for c in parsed.raw_output_contents]
    np.testing.assert_array_equal(contents[0], values)
    assert contents[1].size == 0
    np.testing.assert_array_equal(contents[2], values[::-1])


COPY_S = 0.05  # how long the simulated gRPC copy of a large response holds the loop


def test_large_responses_are_handed_over_one_at_a_time_with_the_loop_free_between() -> None:
    large = bytes(transport.LARGE_RESPONSE_BYTES)

    async def scenario() -> tuple[list[float], float, list[float]]:
        handed: list[float] = []
        ticks: list[float] = []

        async def send_large() -> None:
            await transport._paced(large)
            handed.append(time.perf_counter())
            time.sleep(COPY_S)  # gRPC copies it on the loop, right after the handler returns

        async def send_small() -> float:
            await asyncio.sleep(0.001)  # while a large one holds its turn
            started = time.perf_counter()
            await transport._paced(b"small")
            return time.perf_counter() - started

        async def tick() -> None:  # a health check's share of the loop
            while len(handed) < 3:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.002)

        *_, small_wait, _ = await asyncio.gather(
            send_large(), send_large(), send_large(), send_small(), tick())
        return handed, small_wait, ticks

    handed, small_wait, ticks = asyncio.run(scenario())
    assert small_wait < 0.01
    for first, second in zip(handed, handed[1:]):
        # the next one waits for the copy, then twice as long, while the loop serves others
        assert second - first >= 3 * COPY_S * 0.95
        between = [t for t in ticks if first + COPY_S <= t < second]
        assert len(between) >= 3, "the loop ran nothing else between two large responses"
