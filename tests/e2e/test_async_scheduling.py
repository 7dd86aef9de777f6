"""Under async scheduling (GPU only: vLLM's CPU platform turns it off) ReFreeKV's scheduler forms
exactly plain vLLM's steps for the same arrivals: a closed loop of short prompts (none scored)
keeps 16 requests running, each finished request replaced at once, and every step's shape
(requests, tokens) must match."""

import random

import pytest
import torch

from tests.e2e.engines import in_process_engine, recorded_steps, scheduler_of

pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

NUM_REQUESTS, RUNNING = 48, 16


def closed_loop_steps(model, refreekv: dict | None) -> tuple[str, list[tuple[int, int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(0)
    prefix = [rng.randrange(100, 1000) for _ in range(40)]
    prompts = [prefix + [rng.randrange(100, 1000) for _ in range(rng.randint(30, 130))]
               for _ in range(NUM_REQUESTS)]
    output_lens = [rng.randint(24, 48) for _ in range(NUM_REQUESTS)]
    extra_args = None if refreekv is None else {"refreekv_threshold": 0.0}
    with in_process_engine(model, refreekv, max_num_seqs=RUNNING, async_scheduling=True,
                           dtype="bfloat16") as llm, recorded_steps(llm) as steps:
        engine, added, finished = llm.llm_engine, 0, 0

        def add() -> None:
            nonlocal added
            engine.add_request(str(added), TokensPrompt(prompt_token_ids=prompts[added]),
                               SamplingParams(max_tokens=output_lens[added], ignore_eos=True,
                                              temperature=0, extra_args=extra_args))
            added += 1

        for _ in range(RUNNING):
            add()
        while finished < NUM_REQUESTS:
            for output in engine.step():
                if output.finished:
                    finished += 1
                    if added < NUM_REQUESTS:
                        add()
        return type(scheduler_of(llm)).__name__, list(steps)


def test_async_scheduler_forms_plain_vllm_steps(tiny_llama_dir):
    plain_scheduler, plain_steps = closed_loop_steps(tiny_llama_dir, None)
    refreekv_scheduler, refreekv_steps = closed_loop_steps(tiny_llama_dir, {})
    assert (plain_scheduler, refreekv_scheduler) == ("AsyncScheduler", "RefreeKVAsyncScheduler")
    assert any(tokens > requests for requests, tokens in plain_steps)  # prompts mid-stream
    assert refreekv_steps == plain_steps
