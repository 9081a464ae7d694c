"""The cores of the single-verb commands: inspect, bench, compare, init (starter), passes (catalog), sweep (sweeper).

Each is plain library code that its command in optcli.cli calls (and optcli.api, for sweep); none imports Typer.
The run spine (recipe, runner, steps, gates, measure ...) sits below them and never imports them.
"""
