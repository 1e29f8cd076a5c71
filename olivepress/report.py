"""``olivepress report``: the held-out loss of every model of a run, as a Markdown table and a PNG plot.

The figures come from the stage manifests; with ``--compare`` two or more runs stand side by side (for example
AWQ against RTN, or quantize-then-finetune against finetune-then-quantize).
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from contract import registry, volume
from contract.exits import BadInput

# Each scored model, in pipeline order: (stage whose manifest has it, key in its metrics, label).
POINTS = registry.report_points()


def run_figures(root: Path) -> dict[str, dict[str, float]]:
    """label -> {loss, perplexity, tokens} for every point this run has."""
    figures = {}
    for stage, key, label in POINTS:
        manifest = volume.read_manifest(volume.stage_dir(root, stage)) or {}
        if key in manifest.get("metrics", {}):
            figures[label] = manifest["metrics"][key]
    return figures


def markdown(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(runs)
    header = "| model | " + " | ".join(f"{n} loss | {n} perplexity" for n in names) + " |"
    lines = [header, "|---|" + "---|---|" * len(names)]
    for _, _, label in POINTS:
        cells = []
        for name in names:
            point = runs[name].get(label)
            cells += [f"{point['loss']:.4f}", f"{point['perplexity']:.2f}"] if point else ["–", "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tokens = {name: next(iter(figures.values()))["tokens"] for name, figures in runs.items() if figures}
    lines.append("")
    lines.append(
        "Held-out loss: mean negative log-likelihood (nats) of the response tokens of the held-out rows; "
        "perplexity = exp(loss). Tokens scored: " + ", ".join(f"{n} {t}" for n, t in tokens.items()) + "."
    )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels = [label for _, _, label in POINTS]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, figures in runs.items():
        xs = [i for i, label in enumerate(labels) if label in figures]
        ax.plot(xs, [figures[labels[i]]["loss"] for i in xs], marker="o", label=name)
    ax.set_xticks(range(len(labels)), [label.replace(" (", "\n(").replace(", ", ",\n") for label in labels])
    ax.set_ylabel("held-out loss (nats, lower is better)")
    ax.set_title("What each stage cost or gained")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("report")
@volume.home_option("The run to report")
@click.option(
    "--compare",
    "others",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Another run's volume to put beside it (repeatable).",
)
@click.option(
    "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for report.md/.png."
)
def command(root: Path | None, others: tuple[Path, ...], output: Path) -> None:
    """Write report.md (a table) and report.png (a plot) of the held-out loss at every stage.

    \b
    Examples:
      olivepress report --output report/
      olivepress report --home runs/awq --compare runs/rtn --output report/
    """
    homes = [volume.home(root), *(p.resolve() for p in others)]
    runs = {}
    for home in homes:
        figures = run_figures(home)
        if not figures:
            raise BadInput(f"{home} has no held-out figures: run the stages with --evaluate (the default)")
        runs[home.name if home.name not in runs else str(home)] = figures
    output.mkdir(parents=True, exist_ok=True)
    table = markdown(runs)
    (output / "report.md").write_text("# olivepress: held-out loss per stage\n\n" + table)
    plot(runs, output / "report.png")
    click.echo(table)
    click.echo(f"wrote {output / 'report.md'} and {output / 'report.png'}")
    for name, figures in runs.items():
        quantized, finetuned = (
            registry.STAGES["quantize"].metrics["quantized"],
            registry.STAGES["finetune"].metrics["finetuned"],
        )
        if quantized in figures and finetuned in figures:
            change = figures[finetuned]["loss"] - figures[quantized]["loss"]
            click.echo(
                f"{name}: finetuning changed held-out loss by {change:+.4f} nats ({math.exp(-change):.3f}x likelihood)"
            )
