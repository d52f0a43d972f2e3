"""A conversation through a real Envoy and EPP's default configuration (OpenAI SDK, streamed): the pod caches the
answer it generated, and the next turn resends it. EPP reads the answer from the response body and indexes it
with the prompt (epp/api/answer.py, approx-prefix-cache-producer), so the next turn's predicted cached tokens
count the answer too: the prediction audit's error for that turn is well under the answer's length."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from epp.stack.local import LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS
from tests.e2e.test_operability import eventually, scrape, total

SYSTEM = "You keep the ledger of a small bakery and answer in full sentences. " * 30
ANSWER_TOKENS = 96
ERROR = "epp_prefix_prediction_error_tokens"


@pytest.fixture(scope="module")
def one_pod() -> Iterator[LocalStack]:
    with LocalStack(pods=1, sim_args=SIM_ARGS) as s:
        yield s


def _audited(stack: LocalStack) -> tuple[float, float]:
    s = scrape(stack)[0]
    return total(s, f"{ERROR}_count"), total(s, f"{ERROR}_sum")


def _turn(client: openai.OpenAI, stack: LocalStack, messages: list[dict]) -> tuple[str, float]:
    """Stream one turn; its answer and the prediction audit's absolute error for it, in tokens."""
    count, error = _audited(stack)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=ANSWER_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert eventually(lambda: _audited(stack)[0] > count, 10)
    return answer, _audited(stack)[1] - error


def test_the_next_turn_is_predicted_to_hit_the_answer_too(one_pod):
    client = openai.OpenAI(base_url=f"{one_pod.url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who bakes on Mondays?"},
                {"role": "assistant", "content": "Anna bakes on Mondays."},
                {"role": "user", "content": "And how many loaves?"}]
    answer, _ = _turn(client, one_pod, messages)  # a conversation already: its answer is indexed
    assert len(answer.split()) > 20
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Thank you. Tuesdays?"}]
    _, error = _turn(client, one_pod, messages)
    assert error < ANSWER_TOKENS / 3, error  # without the answer indexed, about ANSWER_TOKENS short
