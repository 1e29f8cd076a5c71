"""A click command with one extra option that can send the whole invocation somewhere else.

``olivepress infer --image IMAGE`` runs infer in a container and ``olivepress run --on azureml`` runs the pipeline
as an Azure ML job: in both, the extra option is taken out of the raw arguments before the command parses them,
and the rest go unparsed to where the option points.
"""

from __future__ import annotations

from typing import Any

import click


def pop_option(args: list[str], *names: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from raw args; return the (last) value and the rest."""
    value, rest, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg in names and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        key, eq, val = arg.partition("=")
        if eq and key in names:
            value, i = val, i + 1
            continue
        rest.append(arg)
        i += 1
    return value, rest


class DivertingCommand(click.Command):
    """``command`` plus ``option``; when ``diverts(value, rest)`` says so, ``divert`` runs instead of ``command``.

    Otherwise the command parses and runs as it always does (the option's own value is dropped before its
    callback). Subclasses give ``diverts`` and ``divert``.
    """

    def __init__(self, command: click.Command, option: click.Option) -> None:
        inner = command.callback
        assert inner is not None and option.name is not None
        self.option_name = option.opts[0]

        def callback(**kwargs: Any) -> Any:
            kwargs.pop(option.name)
            return inner(**kwargs)

        super().__init__(
            name=command.name,
            context_settings=command.context_settings,
            callback=callback,
            params=[*command.params, option],
            help=command.help,
            epilog=command.epilog,
            short_help=command.short_help,
            add_help_option=command.add_help_option,
            no_args_is_help=command.no_args_is_help,
            hidden=command.hidden,
            deprecated=command.deprecated,
        )

    def diverts(self, value: str | None, rest: list[str]) -> bool:
        raise NotImplementedError

    def divert(self, ctx: click.Context, value: str, rest: list[str]) -> Any:
        raise NotImplementedError

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        value, rest = pop_option(list(args), self.option_name)
        if not self.diverts(value, rest):
            return super().parse_args(ctx, args)
        ctx.meta["olivepress.diverted"] = (value, rest)
        return []

    def invoke(self, ctx: click.Context) -> Any:
        if "olivepress.diverted" not in ctx.meta:
            return super().invoke(ctx)
        return self.divert(ctx, *ctx.meta["olivepress.diverted"])
