"""How much the direct inverter's range rescale (`harness.science.inverters.stretch_factor`) changes what a
run reports: the candidates a run left behind (its `inverter.pt` beside its `config.yaml`: a
`harness run` output folder or a Ray trial's checkpoint folder) scored under each rule the harness
has shipped, by the same evaluator.

  python benchmarks/rescale_rules.py DIR [DIR ...] [--json out.json]
  python benchmarks/rescale_rules.py --tiny          # a 1-epoch direct run made here, then scored

Rules: `min` (the smallest allowed stretch over the significant pixels: no_room 0, outliers 0, the
rule before the range rescale was made robust), `0.02` (no_room 0.02, outliers 0.02) and `now` (the
defaults). Per rule: coverage on both sides at the two bars, the gaps, and how many candidates were
shrunk to the origin (stretch < 0.05: the mean image)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, report, table  # noqa: E402

RULES = {"min": {"no_room": 0.0, "outliers": 0.0}, "0.02": {"no_room": 0.02, "outliers": 0.02}, "now": {}}
SHOWN = ("train_coverage", "heldout_coverage", "coverage_gap", "coverage_gap_strict", "top10_gap")


def run_folders(paths: list[Path]) -> list[Path]:
    """Each folder holding config.yaml and inverter.pt; for a Ray trial folder, its last checkpoint."""
    found = []
    for path in paths:
        if (path / "config.yaml").exists() and (path / "inverter.pt").exists():
            found.append(path)
            continue
        checkpoints = sorted(path.glob("checkpoint_*"))
        if checkpoints and (checkpoints[-1] / "inverter.pt").exists():
            found.append(checkpoints[-1])
        else:
            found += run_folders(sorted(p for p in path.iterdir() if p.is_dir()))
    return found


def score(folder: Path) -> dict[str, dict[str, float]]:
    import torch
    import yaml

    from harness.config import build_config
    from harness.science.inverters import stretch_factor
    from harness.trial import Trial

    cfg = build_config(yaml.safe_load((folder / "config.yaml").read_text()))
    if cfg.inverter != "direct" or cfg.direct.rescale != "range":
        raise SystemExit(f"error: {folder}: not a direct run with direct.rescale: range; nothing to compare")
    trial = Trial(cfg)
    trial.inverter.load_state_dict(torch.load(folder / "inverter.pt", map_location="cpu"))
    raw, labels = trial.inverter.images.detach().cpu(), trial.inverter.labels.cpu()
    origin = trial.inverter.origin.cpu()
    out = {}
    for name, options in RULES.items():
        s = stretch_factor(raw, origin, **options)
        images = (origin + s[:, None, None, None] * (raw - origin)).clamp(-1, 1)
        metrics = trial.evaluator(images, labels).metrics
        out[name] = {**{k: metrics[k] for k in SHOWN}, "at_origin": int((s < 0.05).sum()), "candidates": len(s)}
    return out


def tiny_run(into: Path) -> Path:
    from harness.config import build_config
    from harness.trial import Trial

    cfg = build_config({"inverter": "direct", "data": {"train_size": 20},
                        "classifier": {"arch": "mlp", "widths": [64], "norm": "none", "bias": False, "dropout": 0,
                                       "center": True, "optimizer": "gd", "steps": 20},
                        "evaluator": {"epochs": 1}, "eval": {"per_class": 4, "diversity_pairs": 5},
                        "loss": {"ce": 0, "tv": 0, "bn": 0, "kkt": 1, "pixel": 1},
                        "direct": {"rescale": "range"}, "train": {"epochs": 1, "steps_per_epoch": 3}})
    trial = Trial(cfg)
    trial.step()
    trial.write_outputs(into)
    return into


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", type=Path, help="run output folders or Ray trial/experiment folders")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [tiny_run(Path(tmp) / "tiny")] if args.tiny else args.folders
        if not paths:
            raise SystemExit("error: give run folders (or --tiny)")
        folders = run_folders(paths)
        if not folders:
            raise SystemExit("error: no folder with config.yaml and inverter.pt under the paths given")
        scored = {str(f): score(f) for f in folders}
    rows = [[Path(f).parent.name if Path(f).name.startswith("checkpoint_") else Path(f).name, rule,
             *[f"{m[k]:.3f}" for k in SHOWN], f"{m['at_origin']} of {m['candidates']}"]
            for f, by_rule in scored.items() for rule, m in by_rule.items()]
    means = {rule: {k: sum(s[rule][k] for s in scored.values()) / len(scored) for k in (*SHOWN, "at_origin")}
             for rule in RULES}
    mean_table = table(["mean over runs", *SHOWN, "at the origin"],
                       [[rule, *[f"{m[k]:.3f}" for k in SHOWN], f"{m['at_origin']:.1f}"] for rule, m in means.items()])
    report("Range rescale rules on the same candidates", ["run", "rule", *SHOWN, "at the origin"], rows,
           [f"Mean over the {len(scored)} runs:\n\n{mean_table}"], {"runs": scored, "mean": means, "rules": RULES},
           args.json)

if __name__ == "__main__":
    main()
