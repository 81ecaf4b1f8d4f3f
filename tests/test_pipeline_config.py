"""The ``pipelines`` config section: what loads, and every problem reported with its
line, key and a suggestion (``laneway.broker.config.pipelines``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from laneway.broker.config.model import ConfigValidationError, LanewayConfig, config_json_schema, parse_config
from laneway.broker.config.pipelines import GatherStep, MapStep, SplitStep

BASE = """\
providers:
  mock: {type: mock}
routes:
  chat:
    targets: [{provider: mock, model: mock-chat}]
  embed:
    targets: [{provider: mock, model: mock-embedding}]
"""


def problems(pipelines: str) -> list[str]:
    with pytest.raises(ConfigValidationError) as caught:
        parse_config(BASE + pipelines, source="p.yaml")
    return [str(p) for p in caught.value.problems]


def test_the_documented_example_loads() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "pipelines.md").read_text()
    block = re.search(r"<!-- pipeline-example.*?```yaml\n(.*?)```", doc, re.S)
    assert block is not None
    config = parse_config(BASE + block.group(1), source="docs/pipelines.md")
    ingest = config.pipelines["ingest"].steps
    assert isinstance(ingest[0], SplitStep) and ingest[0].overlap == 100
    assert isinstance(ingest[1], MapStep) and ingest[1].over == "chunks" and ingest[1].on_failure == "fail"
    assert isinstance(ingest[2], GatherStep) and ingest[2].from_ == "vectors"
    assert [s.name for s in config.pipelines["analysis"].steps] == ["extract", "analyze", "summarize"]


def test_unknown_route_names_the_line_and_the_closest_route() -> None:
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: a, kind: chat, route: chta, template: "{{ input }}"}
"""
    )
    assert found == ["p.yaml:11: pipelines.p.steps[0].route: unknown route 'chta'; known: 'chat', 'embed' "
                     "(did you mean 'chat'?)"]  # fmt: skip


def test_a_forward_reference_is_a_cycle_and_is_refused() -> None:
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: a, kind: chat, route: chat, template: "{{ steps.b.text }}"}
      - {name: b, kind: chat, route: chat, template: "{{ steps.a.text }}"}
      - {name: c, kind: gather, from: c}
"""
    )
    assert len(found) == 2
    assert found[0].startswith(
        "p.yaml:11: pipelines.p.steps[0].template: refers to step 'b', which runs later"
    )
    assert "cycle" in found[0]
    assert found[1].startswith("p.yaml:13: pipelines.p.steps[2].from: refers to itself")


def test_references_must_name_an_earlier_step_of_the_right_kind() -> None:
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: text, kind: chat, route: chat, template: "{{ input }}"}
      - {name: chunks, kind: split, source: txet}
      - {name: vectors, kind: map, over: text, route: embed}
      - {name: all, kind: gather, from: chunks}
      - {name: out, kind: sink, from: chunks, bucket: b}
"""
    )
    assert found == [
        "p.yaml:12: pipelines.p.steps[1].source: unknown step 'txet'; earlier chat steps: 'text' "
        "(did you mean 'text'?)",
        "p.yaml:13: pipelines.p.steps[2].over: step 'text' is a chat step; this needs a split step",
        "p.yaml:14: pipelines.p.steps[3].from: step 'chunks' is a split step; this needs a map step",
        "p.yaml:15: pipelines.p.steps[4].from: step 'chunks' is a split step; this needs a map step",
    ]


def test_templates_are_parsed_and_their_names_checked_at_load() -> None:
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: a, kind: chat, route: chat, template: "{{ inptu }}"}
      - {name: b, kind: chat, route: chat, template: "{{ steps.a.vectors }}"}
      - {name: c, kind: chat, route: chat, template: "{% if %}"}
      - {name: d, kind: chat, route: chat, template: "{{ item }}"}
"""
    )
    assert found[0] == (
        "p.yaml:11: pipelines.p.steps[0].template: template names 'inptu', which is not defined; "
        "defined: input, steps (did you mean 'input'?)"
    )
    assert "steps.a.vectors; a chat step's output is steps.a.text" in found[1]
    assert found[2].startswith("p.yaml:13: pipelines.p.steps[2].template: template does not parse")
    # item and index exist only in a map step's template.
    assert "template names 'item', which is not defined" in found[3]


def test_map_templates_may_use_item_and_index() -> None:
    config = parse_config(
        BASE
        + """\
pipelines:
  p:
    steps:
      - {name: chunks, kind: split, by: tokens, size: 50, overlap: 5}
      - {name: answers, kind: map, over: chunks, route: chat, job: chat, template: "{{ index }}: {{ item }}"}
""",
        source="p.yaml",
    )
    assert config.pipelines["p"].steps[1].kind == "map"


def test_unknown_keys_duplicate_names_and_bad_overlap_are_reported() -> None:
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: a, kind: split, size: 10, overlap: 10, sise: 3}
"""
    )
    assert "p.yaml:11: pipelines.p.steps[0].overlap: must be less than size (10), got 10" in found
    assert any("pipelines.p.steps[0].sise: unknown key 'sise'" in p and "size" in p for p in found)
    dupes = problems(
        """\
pipelines:
  p:
    steps:
      - {name: a, kind: split}
      - {name: a, kind: split}
"""
    )
    assert dupes == ["p.yaml:12: pipelines.p.steps[1].name: step name 'a' is used by an earlier step; "
                     "step names must be unique"]  # fmt: skip


def test_a_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match=r"pipelines\.p\.steps\.0\.route: unknown route 'nope'"):
        LanewayConfig.model_validate(
            {
                "providers": {"mock": {"type": "mock"}},
                "routes": {"chat": {"targets": [{"provider": "mock", "model": "m"}]}},
                "pipelines": {
                    "p": {"steps": [{"name": "a", "kind": "chat", "route": "nope", "template": "x"}]}
                },
            }
        )


def test_the_schema_documents_the_section() -> None:
    schema = config_json_schema()
    assert "pipelines" in schema["properties"]
    step = schema["$defs"]["MapStep"]["properties"]
    assert "succeeded" in step["on_failure"]["description"]
    assert schema["$defs"]["GatherStep"]["properties"]["from"]["description"]


def test_classification_steps_need_labels_and_offer_their_label() -> None:
    (few,) = problems(
        """\
pipelines:
  p:
    steps:
      - {name: kind, kind: classification, route: chat, labels: [bug]}
"""
    )
    assert few.startswith("p.yaml:11: pipelines.p.steps[0].labels:") and "at least 2" in few
    found = problems(
        """\
pipelines:
  p:
    steps:
      - {name: sort, kind: classification, route: chat, labels: [bug, question]}
      - {name: reply, kind: chat, route: chat, template: "{{ steps.sort.text }}"}
"""
    )
    assert found == [
        "p.yaml:12: pipelines.p.steps[1].template: template reads steps.sort.text; "
        "a classification step's output is steps.sort.label"
    ]
