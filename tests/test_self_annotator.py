"""SelfAnnotator: scripted generation backend, garbage output, the real HF `generate` path on a tiny model, vLLM logic."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
from fake_openai_server import extract_rollout

from trace_trl.annotators import AnnotationRequest, SelfAnnotator
from trace_trl.spans import Span


CORRECT = "We need 12 + 7.\n12 + 7 = 19.\nThe answer is \\boxed{19}."
WRONG = "We need 12 + 7.\n12 + 7 = 18.\nThe answer is \\boxed{18}."


def requests() -> list[AnnotationRequest]:
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    return [
        AnnotationRequest(prompt, CORRECT, True, 1.0, privileged_context="19"),
        AnnotationRequest(prompt, WRONG, False, 0.0, privileged_context="19"),
    ]


class ScriptedSelfAnnotator(SelfAnnotator):
    """The generation backend replaced by a test double that answers from the fenced rollout it is shown."""

    def __init__(self, reply, **kwargs):
        super().__init__(**{"span_format": "quotes", **kwargs})
        self.reply = reply
        self.prompts = []

    def _generate(self, prompts, schemas=None):
        self.prompts.extend(prompts)
        return [self.reply(extract_rollout(prompt[-1]["content"])) for prompt in prompts]


def good_reply(rollout: str) -> str:
    if "= 19" in rollout:
        return json.dumps({"spans": [{"quote": "12 + 7 = 19", "kind": "key"}], "diagnosis": None})
    return "<think>the sum is off</think>" + json.dumps(
        {"spans": [{"quote": "12 + 7 = 18", "kind": "error"}], "diagnosis": "arithmetic_error"}
    )


def test_unbound_self_annotator_explains_how_to_bind():
    with pytest.raises(RuntimeError, match=r"TRACETrainer\(.*annotator=SelfAnnotator\(\)\)"):
        SelfAnnotator()(requests())


def test_scripted_backend_gives_parsed_annotations():
    annotator = ScriptedSelfAnnotator(good_reply)
    annotator.bind(object())
    good, bad = annotator(requests())
    start = CORRECT.index("12 + 7 = 19")
    assert good.error is None and good.spans == (Span(start, start + 11, "key"),)
    start = WRONG.index("12 + 7 = 18")
    assert bad.spans == (Span(start, start + 11, "error"),) and bad.diagnosis == "arithmetic_error"
    # Same prompt as the API annotator: system + user message, the rollout fenced as data.
    assert [m["role"] for m in annotator.prompts[0]] == ["system", "user"]
    assert extract_rollout(annotator.prompts[1][-1]["content"]) == WRONG
    assert annotator.metrics()["annotator/requests"] == 2 and annotator.metrics()["annotator/failures"] == 0
    assert annotator([]) == []


def test_garbage_output_degrades_to_failures():
    replies = iter(["the key step is where we add", '{"spans": "not a list"}'])
    annotator = ScriptedSelfAnnotator(lambda rollout: next(replies))
    annotator.bind(object())
    annotations = annotator(requests())
    assert [a.failed for a in annotations] == [True, True]
    assert all(a.error.startswith("unparseable self-annotation") for a in annotations)
    assert annotator.metrics()["annotator/failures"] == 2


def test_generation_errors_degrade_to_failures():
    class Broken(SelfAnnotator):
        def _generate(self, prompts, schemas=None):
            raise RuntimeError("CUDA out of memory")

    annotator = Broken()
    annotator.bind(object())
    annotations = annotator(requests())
    assert all(a.failed and "CUDA out of memory" in a.error for a in annotations)

    short = ScriptedSelfAnnotator(good_reply)
    short._generate = lambda prompts, schemas=None: ["{}"]  # wrong number of outputs
    short.bind(object())
    assert all(a.failed for a in short(requests()))


def test_pickle_drops_the_trainer():
    annotator = ScriptedSelfAnnotator(good_reply)
    annotator.bind(SimpleNamespace(model="huge"))
    assert pickle.loads(pickle.dumps(annotator))._trainer is None
    assert "bound=True" in repr(annotator)


def test_hf_generate_path_on_a_tiny_model(tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    trainer = SimpleNamespace(
        model=model,
        processing_class=tokenizer,
        accelerator=Accelerator(cpu=True),
        use_vllm=False,
        chat_template_kwargs={"enable_thinking": False},
    )
    annotator = SelfAnnotator(max_new_tokens=8, batch_size=2, span_format="quotes")
    annotator.bind(trainer)
    batch = requests() + requests()[:1]
    annotations = annotator(batch)
    assert len(annotations) == 3
    # A random tiny model writes garbage: failures, counted, never an exception.
    metrics = annotator.metrics()
    assert metrics["annotator/requests"] == 3
    assert metrics["annotator/failures"] == sum(a.failed for a in annotations)
    assert tokenizer.padding_side == "right" and model.training  # state restored


def test_vllm_colocate_path_uses_its_own_sampling_params(monkeypatch):
    calls = []

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append(("generate", prompts, sampling_params, use_tqdm))
            return [
                SimpleNamespace(outputs=[SimpleNamespace(text='{"spans": [], "diagnosis": null}')]) for _ in prompts
            ]

        def wake_up(self, tags):
            calls.append(("wake_up", tags))

        def sleep(self, level):
            calls.append(("sleep", level))

    generation = SimpleNamespace(llm=FakeLLM(), enable_sleep_mode=True, _llm_weights_sleeping=True)
    generation.sync_weights = lambda: calls.append(("sync_weights",))
    trainer = SimpleNamespace(
        use_vllm=True, vllm_generation=generation, processing_class=_Tokenizer(), chat_template_kwargs={"a": 1}
    )
    annotator = SelfAnnotator(
        max_new_tokens=7,
        temperature=0.5,
        chat_template_kwargs={"enable_thinking": False},
        span_format="quotes",
        structured_output=False,
    )
    monkeypatch.setattr(
        SelfAnnotator,
        "_vllm_sampling_params",
        lambda self: {"temperature": self.temperature, "max_tokens": self.max_new_tokens},
    )
    annotator.bind(trainer)
    annotations = annotator(requests())
    assert [a.error for a in annotations] == [None, None]
    names = [c[0] for c in calls]
    assert names == ["sync_weights", "wake_up", "generate", "sleep"]
    _, prompts, params, use_tqdm = calls[2]
    assert params == {"temperature": 0.5, "max_tokens": 7} and use_tqdm is False
    assert len(prompts) == 2 and all("prompt_token_ids" in p for p in prompts)
    assert trainer.vllm_generation._llm_weights_sleeping is True
    # The trainer's template kwargs, overridden by the annotator's own.
    assert _Tokenizer.rendered[0].startswith("{'a': 1, 'enable_thinking': False}|")


def test_vllm_structured_output_binds_each_rollout_to_its_own_answers(monkeypatch):
    """With `structured_output` (the default) each prompt gets its own constraint: compact JSON of the segment schema,
    only the rollout's segment numbers, only its kind and its kind's labels, at most as many entries as asked for."""
    import re

    from trace_trl.annotators.prompts import segment_response_schema

    seen = []

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            seen.append((prompts, sampling_params))
            return [SimpleNamespace(outputs=[SimpleNamespace(text='{"segments":[],"type":null}')]) for _ in prompts]

    monkeypatch.setattr(SelfAnnotator, "_vllm_sampling_params", lambda self, constraint=None: constraint)
    generation = SimpleNamespace(llm=FakeLLM(), enable_sleep_mode=False)
    trainer = SimpleNamespace(use_vllm=True, vllm_generation=generation, processing_class=_Tokenizer())
    annotator = SelfAnnotator()
    annotator.bind(trainer)
    annotations = annotator(requests())
    assert [a.error for a in annotations] == [None, None]
    ((prompts, (key, error)),) = seen
    assert len(prompts) == 2
    key, error = re.compile(key["regex"]), re.compile(error["regex"])
    assert key.fullmatch('{"segments":[{"id":2,"kind":"key"},{"id":3,"kind":"key"}],"type":"computation"}')
    assert key.fullmatch('{"segments":[],"type":null}')
    assert error.fullmatch('{"segments":[{"id":2,"kind":"error"}],"type":"arithmetic_error"}')
    assert not key.fullmatch('{"segments":[{"id":4,"kind":"key"}],"type":null}'), "the rollout has three segments"
    assert not key.fullmatch('{"segments":[{"id":1,"kind":"error"}],"type":null}'), "a correct rollout has key spans"
    assert not error.fullmatch('{"segments":[],"type":"computation"}'), "a key label on an incorrect rollout"
    assert not key.fullmatch('{"segments": [], "type": null}'), "compact: no whitespace to wander off into"
    four = ",".join(['{"id":1,"kind":"key"}'] * 4)
    assert not key.fullmatch('{"segments":[' + four + '],"type":null}'), "at most one entry per segment"
    for label in segment_response_schema(True)["schema"]["properties"]["type"]["enum"]:
        assert key.fullmatch('{"segments":[],"type":' + json.dumps(label) + "}")
    annotator = SelfAnnotator(max_key_spans=1)
    annotator.bind(trainer)
    annotator(requests())
    key = re.compile(seen[-1][1][0]["regex"])
    assert key.fullmatch('{"segments":[{"id":2,"kind":"key"}],"type":null}')
    assert not key.fullmatch('{"segments":[{"id":2,"kind":"key"},{"id":3,"kind":"key"}],"type":null}'), "max_key_spans"
    # With the quote protocol (free-text quotes), its JSON schema.
    annotator = SelfAnnotator(span_format="quotes")
    annotator.bind(trainer)
    annotator(requests())
    assert all(set(c) == {"json"} for c in seen[-1][1])


class _Tokenizer:
    chat_template = "x"
    rendered: list[str] = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
        text = f"{kwargs}|{messages[-1]['content']}"
        self.rendered.append(text)
        return text

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(text.encode())[:5]}


def test_vllm_tensor_parallel_ranks_share_the_engine_and_keep_their_own_answers(monkeypatch):
    """Two ranks of one TP group: each must call the engine with the group's prompts, then keep its own answers."""
    import torch.distributed as dist

    other_rank = [{"prompt_token_ids": [9, 9]}] * 3  # the other rank holds three requests
    seen = []

    class EchoLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            seen.append(prompts)
            return [SimpleNamespace(outputs=[SimpleNamespace(text=str(p["prompt_token_ids"]))]) for p in prompts]

    def all_gather_object(out, obj, group):
        assert group == "tp-group"
        out[0], out[1] = other_rank, obj  # this process is rank 1 of its group

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "get_rank", lambda group: 1)
    monkeypatch.setattr(SelfAnnotator, "_vllm_sampling_params", lambda self, schema=None: None)
    generation = SimpleNamespace(llm=EchoLLM(), enable_sleep_mode=False, tensor_parallel_size=2, tp_group="tp-group")
    trainer = SimpleNamespace(use_vllm=True, vllm_generation=generation, processing_class=_Tokenizer())
    annotator = SelfAnnotator(span_format="quotes")
    annotator.bind(trainer)
    texts = annotator._generate_vllm(["first", "second"])
    assert len(seen[0]) == 5, "the engine sees the whole group's prompts"
    assert texts == [str(p["prompt_token_ids"]) for p in seen[0][3:]], "rank 1 keeps the answers to its own prompts"
