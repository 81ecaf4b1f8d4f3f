"""The ``pipelines`` section: named chains of steps a run goes through
(``docs/pipelines.md``; run by ``laneway.broker.pipelines``).

The models check each step on its own; ``pipeline_problems`` checks what needs the
whole config: routes that exist, step names used once, references that point back
to an earlier step of the right kind (a reference to the step itself or to a later
one would make the chain a cycle), and templates that parse and name only what a
run will have. Templates are Jinja2 in its sandbox, with undefined names an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Literal

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator, model_validator

from laneway.broker.config.errors import ConfigProblem, YamlDocument, suggest
from laneway.broker.config.providers import ConfigModel
from laneway.broker.core.model import NAME_PATTERN

__all__ = [
    "ChatStep",
    "ClassificationStep",
    "EmbeddingStep",
    "GatherStep",
    "MapStep",
    "PipelineConfig",
    "PipelineProblem",
    "SinkStep",
    "SinkWebhook",
    "SplitStep",
    "Step",
    "pipeline_config_problems",
    "pipeline_problems",
    "referenced_steps",
    "template_environment",
]

_Name = Annotated[str, Field(pattern=NAME_PATTERN)]
_StepLane = Literal["high", "normal", "low"] | None
# What a step's output offers a template (``steps.<name>.<field>``).
OUTPUT_FIELDS = {
    "chat": "text",
    "embedding": "vectors",
    "classification": "label",
    "split": "items",
    "map": "items",
    "gather": "items",
    "sink": "items",
}


class _StepBase(ConfigModel):
    name: _Name
    """The step's name, unique in its pipeline; later templates read its output as
    ``steps.<name>``."""


class ChatStep(_StepBase):
    """One chat job on a route; its user message is the rendered template."""

    kind: Literal["chat"]
    """``chat``."""
    route: _Name
    """The route the job goes to."""
    template: Annotated[str, Field(min_length=1)]
    """Jinja2 template of the user message: ``input`` is the run's input,
    ``steps.<name>.text`` an earlier chat step's answer."""
    system: str = ""
    """System message (not a template); empty: none."""
    lane: _StepLane = None
    """Lane of the job; unset: the config's default lane."""


class EmbeddingStep(_StepBase):
    """One embedding job on a route, embedding the rendered template."""

    kind: Literal["embedding"]
    """``embedding``."""
    route: _Name
    """The route the job goes to."""
    template: Annotated[str, Field(min_length=1)] = "{{ input }}"
    """Jinja2 template of the text to embed (default: the run's input)."""
    lane: _StepLane = None
    """Lane of the job; unset: the config's default lane."""


class ClassificationStep(_StepBase):
    """One classification job on a route: the rendered template, given one of ``labels``."""

    kind: Literal["classification"]
    """``classification``."""
    route: _Name
    """The route the job goes to."""
    labels: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)]
    """The labels to choose from (at least two); later templates read the chosen one
    as ``steps.<name>.label``."""
    template: Annotated[str, Field(min_length=1)] = "{{ input }}"
    """Jinja2 template of the text to classify (default: the run's input)."""
    lane: _StepLane = None
    """Lane of the job; unset: the config's default lane."""


class SplitStep(_StepBase):
    """Text cut into overlapping chunks, deterministically, by the broker (no job)."""

    kind: Literal["split"]
    """``split``."""
    source: _Name = "input"
    """What is split: ``input`` (the run's input) or an earlier chat step's text."""
    by: Literal["characters", "tokens"] = "characters"
    """Unit of ``size`` and ``overlap``: characters, or tokens (whitespace-separated words)."""
    size: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Largest chunk, in units."""
    overlap: Annotated[int, Field(ge=0)] = 0
    """Units each chunk repeats from the end of the one before; below ``size``."""

    @field_validator("overlap")
    @classmethod
    def _check_overlap(cls, value: int, info: ValidationInfo) -> int:
        size = info.data.get("size")
        if size is not None and value >= size:
            # Each chunk must move forward, or splitting never ends.
            raise ValueError(f"must be less than size ({size}), got {value}")
        return value


class MapStep(_StepBase):
    """Fan-out: one job per item of an earlier split step, on a route."""

    kind: Literal["map"]
    """``map``."""
    over: _Name
    """The earlier ``split`` step whose items are mapped."""
    route: _Name
    """The route every item's job goes to (its batching applies: embedding jobs of
    one chunk each share provider calls)."""
    job: Literal["embedding", "chat"] = "embedding"
    """The kind of job per item."""
    template: Annotated[str, Field(min_length=1)] = "{{ item }}"
    """Jinja2 template of each job's text (``item``, ``index``, ``input``, ``steps``)."""
    lane: _StepLane = None
    """Lane of the jobs; unset: the config's default lane."""
    on_failure: Literal["fail", "continue"] = "fail"
    """``fail``: a failed item fails the run. ``continue``: the run goes on with the
    items that succeeded and lists the failed ones (all failing still fails it)."""


class GatherStep(_StepBase):
    """Fan-in: the outputs of every job of an earlier map step, in item order."""

    kind: Literal["gather"]
    """``gather``."""
    from_: Annotated[_Name, Field(alias="from")]
    """The earlier ``map`` step whose outputs are gathered."""


class SinkWebhook(ConfigModel):
    """Where a sink step POSTs its result: a URL, signed with a named secret, delivered
    by the webhook machinery (retries, dead letters, the address guard)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
    """``http://`` or ``https://`` URL the result is POSTed to."""
    secret: _Name
    """Name of the signing secret (a key of ``webhooks.secrets``)."""


class SinkStep(_StepBase):
    """Delivery: every item of an earlier map step, with its input and output, put
    into a JetStream key-value bucket the caller reads back, or POSTed to a webhook
    (no job). Exactly one of ``bucket`` and ``webhook``."""

    kind: Literal["sink"]
    """``sink``."""
    from_: Annotated[_Name, Field(alias="from")]
    """The earlier ``map`` step whose items are delivered."""
    bucket: _Name | None = None
    """The bucket's name; it is ``laneway_sink_<bucket>``, created when the broker
    starts. Item ``i`` of run ``r`` is the key ``<r>.<i>``: JSON with ``run_id``,
    ``index``, ``item`` (the map step's input) and ``output`` (text or vector)."""
    webhook: SinkWebhook | None = None
    """A webhook that receives the items as signed JSON POSTs (``docs/pipelines.md``):
    ``run_id``, ``pipeline``, ``step``, ``part``, ``parts`` and ``items`` (each with
    ``index``, ``item`` and ``output``); a big result comes in several parts."""

    @model_validator(mode="after")
    def _one_destination(self) -> SinkStep:
        if (self.bucket is None) == (self.webhook is None):
            raise ValueError("a sink step needs exactly one of bucket and webhook")
        return self


Step = Annotated[
    ChatStep | EmbeddingStep | ClassificationStep | SplitStep | MapStep | GatherStep | SinkStep,
    Field(discriminator="kind"),
]


class PipelineConfig(ConfigModel):
    """A named chain of steps that ``StartPipeline`` runs, in order."""

    steps: Annotated[tuple[Step, ...], Field(min_length=1, max_length=64)]
    """The steps, run in the order listed (1-64)."""
    deadline_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Seconds a run may take from its start; every job of the run gets this
    deadline. Unset: jobs keep their routes' own behaviour."""
    max_attempts: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Budget of provider attempts for the whole run: the attempts of all its jobs
    together, counted as a route's ``max_attempts`` counts a job's (a rate-limited try
    is not one). A run whose jobs would need more fails, naming the budget; each job
    keeps its route's own ``max_attempts`` too. Unset: no budget."""


_PIPELINES: TypeAdapter[dict[str, PipelineConfig]] = TypeAdapter(dict[_Name, PipelineConfig])


@dataclass(frozen=True, slots=True)
class PipelineProblem:
    """A problem found across keys: where (a key path under the config's root), what, and a fix."""

    path: tuple[str | int, ...]
    message: str
    suggestion: str | None = None


@cache
def template_environment() -> SandboxedEnvironment:
    """The one environment templates are checked and rendered in: sandboxed, and an
    undefined name is an error rather than an empty string."""
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def pipeline_problems(
    pipelines: Mapping[str, PipelineConfig], routes: Sequence[str], secrets: Sequence[str] = ()
) -> list[PipelineProblem]:
    """Every cross-key problem of the ``pipelines`` section, in file order (``secrets``:
    the names in ``webhooks.secrets``)."""
    problems: list[PipelineProblem] = []
    for name, pipeline in pipelines.items():
        problems.extend(_pipeline(name, pipeline, routes, secrets))
    return problems


def pipeline_config_problems(data: Mapping[str, object], doc: YamlDocument) -> list[ConfigProblem]:
    """``pipeline_problems`` of a config file's raw data, with lines. Found on the
    section alone, so they come with schema errors elsewhere; a section that does not
    validate reports its own errors instead."""
    pipelines, routes = data.get("pipelines"), data.get("routes")
    if not pipelines or not isinstance(routes, dict):
        return []
    try:
        checked = _PIPELINES.validate_python(pipelines)
    except ValidationError:
        return []
    webhooks = data.get("webhooks")
    secrets = webhooks.get("secrets") if isinstance(webhooks, dict) else None
    names = [k for k in secrets if isinstance(k, str)] if isinstance(secrets, dict) else []
    found = pipeline_problems(checked, [r for r in routes if isinstance(r, str)], names)
    return [doc.problem(p.path, p.message, p.suggestion) for p in found]


def _pipeline(
    name: str, pipeline: PipelineConfig, routes: Sequence[str], secrets: Sequence[str]
) -> Iterator[PipelineProblem]:
    earlier: dict[str, str] = {}  # step name -> kind, of the steps before the one checked
    names = [s.name for s in pipeline.steps]
    for index, step in enumerate(pipeline.steps):
        at: tuple[str | int, ...] = ("pipelines", name, "steps", index)
        if step.name in earlier or step.name == "input":
            why = "is the run's input" if step.name == "input" else "is used by an earlier step"
            yield PipelineProblem((*at, "name"), f"step name '{step.name}' {why}; step names must be unique")
        route = getattr(step, "route", None)
        if route is not None and route not in routes:
            listed = ", ".join(f"'{r}'" for r in routes)
            yield PipelineProblem(
                (*at, "route"), f"unknown route '{route}'; known: {listed}", suggest(route, routes)
            )
        if isinstance(step, SinkStep) and step.webhook is not None:
            yield from _secret((*at, "webhook", "secret"), step.webhook.secret, secrets)
        for key, ref, kinds in _references(step):
            yield from _reference((*at, key), ref, kinds, earlier, names, index)
        template = getattr(step, "template", None)
        if template is not None:
            extra = {"item", "index"} if isinstance(step, MapStep) else set()
            yield from _template((*at, "template"), template, earlier, names, index, extra)
        earlier[step.name] = step.kind


def _secret(path: tuple[str | int, ...], secret: str, secrets: Sequence[str]) -> Iterator[PipelineProblem]:
    if secret in secrets:
        return
    listed = ", ".join(f"'{n}'" for n in secrets) or "none (webhooks.secrets is empty)"
    yield PipelineProblem(
        path, f"no secret named '{secret}' in webhooks.secrets; known: {listed}", suggest(secret, secrets)
    )


def _references(step: Step) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(key, the step it names, the kinds it may be) of each step reference."""
    if isinstance(step, SplitStep) and step.source != "input":
        yield "source", step.source, ("chat",)
    elif isinstance(step, MapStep):
        yield "over", step.over, ("split",)
    elif isinstance(step, GatherStep | SinkStep):
        yield "from", step.from_, ("map",)


def _reference(
    path: tuple[str | int, ...],
    ref: str,
    kinds: tuple[str, ...],
    earlier: Mapping[str, str],
    names: Sequence[str],
    index: int,
) -> Iterator[PipelineProblem]:
    kind_list = " or ".join(kinds)
    if ref in earlier:
        if earlier[ref] not in kinds:
            yield PipelineProblem(
                path, f"step '{ref}' is a {earlier[ref]} step; this needs a {kind_list} step"
            )
        return
    if ref in names:
        where = "itself" if names.index(ref) == index else f"step '{ref}', which runs later"
        yield PipelineProblem(
            path,
            f"refers to {where}: steps run in the order listed and can only use earlier steps "
            "(a reference forward would make a cycle)",
        )
        return
    candidates = [n for n, k in earlier.items() if k in kinds]
    listed = ", ".join(f"'{n}'" for n in candidates) or "none"
    yield PipelineProblem(
        path, f"unknown step '{ref}'; earlier {kind_list} steps: {listed}", suggest(ref, candidates)
    )


def _template(
    path: tuple[str | int, ...],
    source: str,
    earlier: Mapping[str, str],
    names: Sequence[str],
    index: int,
    extra: set[str],
) -> Iterator[PipelineProblem]:
    env = template_environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as err:
        yield PipelineProblem(path, f"template does not parse (its line {err.lineno}): {err.message}")
        return
    known = {"input", "steps", *extra}
    for name in sorted(jinja2.meta.find_undeclared_variables(tree) - known):
        listed = ", ".join(sorted(known))
        yield PipelineProblem(
            path, f"template names '{name}', which is not defined; defined: {listed}", suggest(name, known)
        )
    for ref, field in _step_refs(tree):
        if ref in earlier:
            want = OUTPUT_FIELDS[earlier[ref]]
            if field is not None and field != want:
                yield PipelineProblem(
                    path,
                    f"template reads steps.{ref}.{field}; a {earlier[ref]} step's output is "
                    f"steps.{ref}.{want}",
                )
            continue
        yield from _reference(path, ref, tuple(OUTPUT_FIELDS), earlier, names, index)


def referenced_steps(template: str) -> set[str]:
    """The steps a (checked) template reads (``steps.<name>``)."""
    return {ref for ref, _ in _step_refs(template_environment().parse(template))}


def _step_refs(tree: jinja2.nodes.Template) -> Iterator[tuple[str, str | None]]:
    """(step, field or None) of every ``steps.<step>[.<field>]`` in a template."""
    for node in tree.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        if not isinstance(node, jinja2.nodes.Getattr | jinja2.nodes.Getitem):
            continue
        inner = node.node
        if isinstance(inner, jinja2.nodes.Name) and inner.name == "steps":
            ref = _key_of(node)
            if ref is not None:
                yield ref, _field_of(tree, node)


def _key_of(node: jinja2.nodes.Getattr | jinja2.nodes.Getitem) -> str | None:
    if isinstance(node, jinja2.nodes.Getattr):
        return str(node.attr)
    arg = node.arg
    return str(arg.value) if isinstance(arg, jinja2.nodes.Const) else None


def _field_of(tree: jinja2.nodes.Template, step_node: jinja2.nodes.Node) -> str | None:
    # The attribute read off ``steps.<step>``, if any (its parent Getattr).
    for node in tree.find_all(jinja2.nodes.Getattr):
        if isinstance(node, jinja2.nodes.Getattr) and node.node is step_node:
            return str(node.attr)
    return None
