"""AsyncEngine on its own: early exits abort, a failing step fails only the requests in flight,
shutdown ends every stream."""

from __future__ import annotations

import asyncio

import pytest

from rarefy.engine.async_engine import AsyncEngine, EngineDeadError
from rarefy.engine.llm_engine import EngineOptions, LLMEngine
from rarefy.layers.sampler import SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True)


@pytest.fixture
def engine(tiny):
    eng = AsyncEngine(LLMEngine(tiny.model, tiny.tokenizer, EngineOptions(kv_dtype="fp32", block_size=8)))
    yield eng
    eng.shutdown()


async def _settle(eng, cond, timeout=30.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_generate_and_early_exit_aborts(engine):
    alloc = engine.engine.cache.allocator

    async def main():
        outs = [o async for o in engine.generate("a", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))]
        assert len(outs) == 6 and outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].token_ids == [o.token_id for o in outs] and outs[-1].output_tokens == 6
        gen = engine.generate("b", [5, 6, 7], LONG)
        async for o in gen:
            if o.output_tokens == 3:
                break
        await gen.aclose()
        await _settle(engine, lambda: alloc.num_used == 0 and not engine.engine.has_work)
        assert engine.stats.finished["abort"] == 1
        with pytest.raises(Exception, match="context"):  # refused by the engine: the stream raises
            async for _ in engine.generate("c", [5] * 300, SamplingParams(max_tokens=10)):
                pass

    asyncio.run(main())


def test_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(engine):
    orig, calls = engine.engine.step, [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return orig()

    engine.engine.step = flaky

    async def main():
        async def run(rid):
            return [o async for o in engine.generate(rid, [5, 6], LONG)]

        res = await asyncio.gather(run("x"), run("y"), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "boom" in str(r) for r in res)
        assert engine.engine.cache.allocator.num_used == 0
        outs = await run_short()
        assert outs[-1].finish_reason == "length"

    async def run_short():
        return [o async for o in engine.generate("z", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True))]

    asyncio.run(main())


def test_shutdown_ends_every_stream(engine):
    async def main():
        stream = engine.add_request("s", [5, 6], LONG)
        await stream.get()  # running
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            engine.add_request("t", [5], LONG)
        assert not engine.is_running and engine.engine.cache.allocator.num_used == 0

    asyncio.run(main())
