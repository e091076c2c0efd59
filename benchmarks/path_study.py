"""Every point of the integration path, per episode: the support set's leave-one-out loss and the query accuracy.

The stopping rule (:mod:`hf_hyperflow.stopping`) sees only the first; this records both at every step of the path
on the validation classes of the training sources, so that any rule (which candidate points, a margin in favour of
direct transfer, judging the middle point only when needed) can be scored afterwards on the same episodes without
running the adapter again (``--rules``).

    python benchmarks/path_study.py --adapter adapters/efficientnet_lite0 \
        --source wesnoth_units=data/wesnoth_units:race:2:3 --source glyphs_2shot=data/glyphs:script:2:3 \
        --episodes 600 --output benchmarks/path_study

Sources as in ``benchmarks/validation.py`` (the same seeded episodes; ``--without-colour`` and ``--outside-training``
as there). One JSON line per episode in
``<output>/<source>.jsonl`` (resumable: episodes already there are skipped); ``--rules`` prints each rule's paired
gain over direct transfer per source from those records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.validation import add_source_arguments, checked_sources, domains_from_arguments  # noqa: E402


def path_record(adapter, support, labels, query, query_labels, steps: int | None = None) -> dict:
    """``{"loss": [K+1 floats or None], "loo_accuracy": [the same], "accuracy": [K+1 floats], "domain_distance":
    float or None}``: the support's leave-one-out loss and accuracy, and the query accuracy, at every step k = 0..K
    of one task's path (``support: Tensor[S, 3, H, W]``, ``labels: LongTensor[S]``, ``query: Tensor[Q, 3, H, W]``;
    K = ``steps``, default the adapter's), and the support's distance to the training domains (None for an adapter
    without a domain reference)."""
    import torch

    from hf_hyperflow.backbones import embed
    from hf_hyperflow.heads import class_prototypes
    from hf_hyperflow.prefix import skip_prefix
    from hf_hyperflow.state import HEAD_KEY
    from hf_hyperflow.stopping import leave_one_out_logits

    drift, steps = adapter.drift, steps or adapter.config.steps
    sizes, classes = [labels.shape[0]], int(labels.max()) + 1
    with torch.no_grad():
        features0, statistics, prefix, output = adapter._first_pass(support, labels, sizes, [classes])
        distances, _ = adapter._domain_distances(statistics)
        encoding = drift.encode_tasks(features0, labels, sizes, [classes], statistics)
        path = drift.integrate(encoding, steps, method=adapter.config.integrator, return_path=True)
        # the queries' frozen prefix runs once (a backbone without a cacheable prefix runs whole every time)
        query0, query_output = prefix.embed_and_keep(query) if prefix is not None else (
            embed(adapter.backbone, query), None)
        losses, hits, accuracies = [], [], []
        for k, state in enumerate(path):
            if k == 0:
                features, query_features = features0, query0
            else:
                features = adapter._adapted_features(support, [state], sizes, prefix, output, True)[0]
                with adapter.tuner.task_deltas(state, [query.shape[0]]), \
                        skip_prefix(prefix, query_output, query.shape[0]):
                    query_features = embed(adapter.backbone, query)
            head = state[HEAD_KEY][0, :classes] if HEAD_KEY in state else None
            judged = leave_one_out_logits(features, labels, classes, head, drift.logit_scale, drift.logit_bias)
            prototypes = class_prototypes(features, labels, classes)
            if head is not None:
                prototypes = prototypes + head
            predicted = drift.logits(query_features, prototypes).argmax(-1).cpu()
            losses.append(None if judged is None else float(torch.nn.functional.cross_entropy(*judged)))
            hits.append(None if judged is None else float((judged[0].argmax(-1) == judged[1]).float().mean()))
            accuracies.append(float((predicted == query_labels.cpu()).float().mean()))
    return {"loss": losses, "loo_accuracy": hits, "accuracy": accuracies,
            "domain_distance": None if distances is None else distances[0]}


def record_source(adapter, name: str, dataset, sampler_kwargs: dict, episodes: int, seed: int, output: Path,
                  steps: int | None = None) -> Path:
    """Append the records of episodes not yet in ``<output>/<name>.jsonl``; returns that path."""
    import torch
    from tqdm.auto import tqdm

    from hf_hyperflow.episodes import EpisodeSampler

    path = output / f"{name.split(' ')[0]}.jsonl"
    done = {json.loads(line)["episode"] for line in path.read_text().splitlines()} if path.exists() else set()
    sampler = EpisodeSampler(dataset, **{**sampler_kwargs, "num_episodes": episodes, "seed": seed})
    with path.open("a") as out:
        for i in tqdm(range(episodes), desc=name):
            if i in done:
                continue
            episode = sampler[i]
            record = path_record(adapter, adapter.pixel_values(episode.support_images),
                                 torch.as_tensor(episode.support_labels), adapter.pixel_values(episode.query_images),
                                 torch.as_tensor(episode.query_labels), steps)
            out.write(json.dumps({"episode": i, **record}) + "\n")
            out.flush()
    return path


def choose(record: dict, rule: dict) -> tuple[int, int]:
    """``(step the rule picks, adapted support passes it needed)`` for one task's path ``record``.

    Among the rule's ``points`` (step indices, 0 first), the smallest loss after adding ``margin`` (plus
    ``relative`` times the loss at 0) to every point but 0, the earliest on ties; the last point when the task
    cannot be judged (loss None). A ``lazy`` rule judges the end of the path first and the points between only
    when the end's loss is not below ``1 - accept`` times the loss at 0. A rule with a ``gate`` keeps 0 (no adapted
    pass) where the support's domain distance exceeds it.
    """
    points, losses = rule["points"], record["loss"]
    if rule["gate"] is not None:
        if record.get("domain_distance") is None:
            raise ValueError(f"rule {rule['text']!r} gates on the support's domain distance, which these records lack: "
                             "record them again with an adapter that has a domain reference.")
        if record["domain_distance"] > rule["gate"]:
            return 0, 0
    if losses[0] is None or rule["end"]:
        return points[-1], 1
    if rule["by_accuracy"]:  # the highest leave-one-out accuracy; ties to the lower loss, or to the earlier point
        hits = record["loo_accuracy"]
        return min(points, key=lambda k: (-hits[k], 0.0 if rule["by_accuracy"] == "earliest" else losses[k], k)), \
            len(points) - 1

    def penalised(k: int) -> float:
        return losses[k] + (rule["margin"] + rule["relative"] * losses[0] if k else 0.0) + \
            rule["per_time"] * losses[0] * k / points[-1]

    if rule["lazy"] and penalised(points[-1]) < losses[0] * (1.0 - rule["accept"]):
        return points[-1], 1
    return min(points, key=lambda k: (penalised(k), k)), len(points) - 1


def score_rules(records: dict[str, list[dict]], rules: list[dict], versus: dict | None = None) -> str:
    """A markdown table: per rule and source, the paired gain over direct transfer (mean, 95% CI, in points), the
    worst and mean over sources, and the mean number of adapted support passes per task; with ``versus`` (a rule),
    the paired difference against that rule instead of against direct transfer."""
    from hf_hyperflow.stats import mean_confidence_interval

    names = list(records)
    lines = ["| rule | " + " | ".join(names) + " | worst | mean | adapted passes |",
             "|---" * (len(names) + 4) + "|"]
    for rule in rules:
        cells, means, passes = [], [], []
        for name in names:
            picks = [(r, *choose(r, rule)) for r in records[name]]
            gains = [100.0 * (r["accuracy"][k] - r["accuracy"][choose(r, versus)[0] if versus else 0])
                     for r, k, _ in picks]
            passes.extend(n for _, _, n in picks)
            mean, half = mean_confidence_interval(gains)
            cells.append(f"{mean:+.2f} ±{half:.2f}")
            means.append(mean)
        lines.append(f"| {rule['text']} | " + " | ".join(cells) + f" | {min(means):+.2f} | "
                     f"{sum(means) / len(means):+.2f} | {sum(passes) / len(passes):.2f} |")
    return "\n".join(lines)


def parse_rule(text: str) -> dict:
    """A rule for :func:`choose` from its text.

    ``"0,4,8@0.05"``: candidate steps, absolute margin; ``"0,4,8%0.1"``: a margin of 10% of the loss at 0;
    ``"0,4,8^0.1"``: a margin of 10% of the loss at 0 times the point's time t; a ``lazy:`` prefix judges the end
    first (``lazy:0,4,8~0.2``: accepted outright when 20% below the loss at 0); ``acc:0,4,8``: the highest
    leave-one-out accuracy, ties to the lower loss (``acce:``: to the earlier point); ``"end"``: fixed steps, always
    the end of the path; a ``>2.2`` suffix (``"0,4,8>2.2"``, ``"end>2.2"``) keeps direct transfer where the
    support's domain distance exceeds 2.2 (the adapter's ``domain_gate``).
    """
    rule = {"text": text, "points": [0, -1], "margin": 0.0, "relative": 0.0, "lazy": False, "accept": 0.0,
            "per_time": 0.0, "end": False, "by_accuracy": None, "gate": None}
    if ">" in text:
        text, gate = text.split(">")
        rule["gate"] = float(gate)
    rule["end"] = text == "end"
    if rule["end"]:  # fixed steps: always the end of the path
        return rule
    rule["by_accuracy"] = {"acc:": "loss", "acce:": "earliest"}.get(text[: text.find(":") + 1]) if ":" in text else None
    body = text.split(":", 1)[1] if rule["by_accuracy"] else text
    body, rule["lazy"] = (body[5:], True) if body.startswith("lazy:") else (body, False)
    for marker, key in (("^", "per_time"), ("~", "accept"), ("@", "margin"), ("%", "relative")):
        if marker in body:
            body, value = body.split(marker)
            rule[key] = float(value)
    rule["points"] = sorted({int(p) for p in body.split(",")})
    if rule["points"][0] != 0:
        raise ValueError(f"a rule's points must include 0 (direct transfer), got {text!r}.")
    return rule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--adapter", type=Path, default=Path("adapters/efficientnet_lite0"))
    add_source_arguments(parser)  # as validation.py takes them
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="integration steps (default: the adapter's)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rules", nargs="*", default=None,
                        help='score rules from the records instead of recording: "0,4,8@0.05" = points, margin')
    parser.add_argument("--versus", default=None, help="with --rules: paired differences against this rule, not dt")
    args = parser.parse_args(argv)
    sources, low_resolution = checked_sources(args)
    if args.rules is not None:
        records = {s["name"]: [json.loads(line) for line in (args.output / f"{s['name']}.jsonl").read_text()
                               .splitlines()][: args.episodes] for s in sources}
        versus = parse_rule(args.versus) if args.versus else None
        print(score_rules(records, [parse_rule(r) for r in args.rules], versus))
        return
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter

    args.output.mkdir(parents=True, exist_ok=True)
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.backbone).eval(), args.adapter)
    for name, (dataset, sampler_kwargs) in domains_from_arguments(args, sources, low_resolution).items():
        record_source(adapter, name, dataset, sampler_kwargs, args.episodes, args.seed, args.output, args.steps)


if __name__ == "__main__":
    main()
