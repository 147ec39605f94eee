"""The `hrn` command line: HRN / MV-HRN training and prediction."""

from __future__ import annotations

import click

from hrn_baseline.environment import environment_report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """hrn: train and run HRN / MV-HRN (hierarchical representation network) models."""


@main.command()
def info():
    """Show library versions, devices and the renderer back ends usable on this machine."""
    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        click.echo(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
