"""`lamina`: one command per job; the ranks are counted from the config, never by hand.

    lamina serve --config configs/default.yaml [--set KEY=VALUE ...]
    lamina generate --config CFG --input IN.jsonl --output OUT.jsonl [--resume | --overwrite] [--quiet]
    lamina serve MODEL [--port N ...]          (MODEL: a checkpoint, a Hugging Face directory or a GGUF file)
    lamina convert --source gguf --input model.gguf --output checkpoints/model
    lamina plan search --model llama3-8b --synthetic --trace TRACE --slo-tpot 0.05
    lamina --version

`serve` and `generate` first check, in this process, everything that can be checked before a
rank starts: the config, its layout against the checkpoint's architecture, the input file,
the output's lock, the server's port. A mistake is one `error:` line and exit status 2.
Then they start parallel.tensor_parallel + parallel.attention_workers ranks of the rank
program (megatron_lamina/launch/serve.py, generate.py) through torch's launcher API
(`launch/ranks.py`) and exit with the job's status. `convert` runs the checkpoint converter.
`plan` runs the planner (megatron_lamina/planner/command.py).
`lamina COMMAND --help` lists a command's options. The torchrun commands
(`torchrun --nproc-per-node N launcher/serve.py ...`) run the same rank programs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_lamina.launch.nodes import node_launch, node_name

COMMANDS = {
    "serve": "OpenAI-compatible HTTP server (rank 0 serves server.host:server.port)",
    "generate": "offline batch generation, JSONL in, JSONL out",
    "convert": "convert a Hugging Face, GGUF, Megatron or DeepSpeed checkpoint into a canonical one",
    "plan": "the planner: rank layouts for a trace by throughput per dollar (search), or predict one (simulate)",
}


def usage() -> str:
    lines = ["usage: lamina COMMAND [options]   (lamina COMMAND --help lists a command's options)", "", "commands:"]
    return "\n".join(lines + [f"  {name:<10}{what}" for name, what in COMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"lamina (megatron-lamina) {version('megatron-lamina')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "convert":
        from megatron_lamina.launch.convert import main as convert

        return convert(rest, prog="lamina convert")
    if command == "plan":
        from megatron_lamina.planner.command import main as plan

        return plan(rest, prog="lamina plan")
    if command == "serve":
        from megatron_lamina.launch.serve import build_parser
    else:
        from megatron_lamina.launch.generate import build_parser
    parser = build_parser(prog=f"lamina {command}")
    parser.add_argument("--print-launch", action="store_true",
                        help="print the command each machine runs for this config (deployment.nodes) and exit")
    args = parser.parse_args(rest)
    if args.print_launch:
        return print_launch(command, args)
    try:
        cfg = check_job(command, args)
        node = node_launch(cfg, args)
    except (ValueError, OSError) as e:  # ConfigError, a checkpoint or file that is not there, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_lamina.launch.ranks import start_ranks

    par = cfg.parallel
    where = f" on {node_name(cfg, node.node_rank)} of {node.nnodes}, rendezvous {node.endpoint}" if node.several else ""
    print(f"lamina: starting {node.nproc} ranks{where} ({par.tensor_parallel} model worker(s), "
          f"{par.attention_workers} attention worker(s) in the job)", file=sys.stderr, flush=True)
    grace = cfg.server.drain_timeout_s + 10 if command == "serve" else 30.0
    return start_ranks(node.nproc, command, rest, shutdown_timeout_s=grace, node=node, cfg=cfg)


def print_launch(command: str, args) -> int:
    """`--print-launch`: each machine's command line, one per line (node rank order)."""
    from megatron_lamina.config import ConfigError, config_from_args
    from megatron_lamina.launch.nodes import launch_commands, node_name

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.config is None:
        print("error: --print-launch needs --config (the file every machine reads)", file=sys.stderr)
        return 2
    commands = launch_commands(command, args.config, cfg, args.rdzv_endpoint, args.rdzv_id)
    for rank, line in enumerate(commands):
        print(f"# {node_name(cfg, rank)}\n{line}")
    return 0


def check_job(command: str, args):
    """The config of a serve / generate job, checked as far as it can be without the ranks."""
    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.errors import open_safetensors
    from megatron_lamina.checkpoint.auto_convert import with_canonical_checkpoint
    from megatron_lamina.config import check_device, config_from_args, validate_layout

    from megatron_lamina.launch.nodes import node_rank_of

    cfg = config_from_args(args)
    check_device(cfg)
    model_node = node_rank_of(cfg, args) == 0  # attention nodes read only the architecture
    try:  # a Hugging Face directory or GGUF file is converted here, once, before any rank starts
        cfg = with_canonical_checkpoint(cfg, args.config, log=lambda line: print(f"lamina: {line}", file=sys.stderr,
                                                                                 flush=True))
        arch = read_architecture(cfg.model.checkpoint)
        if model_node:
            from megatron_lamina.checkpoint.writer import MODEL_FILE  # brings torch: not before a config mistake

            open_safetensors(Path(cfg.model.checkpoint) / MODEL_FILE)  # reads the header: truncated, corrupt?
    except (OSError, ValueError) as e:  # CheckpointInputError is a ValueError
        raise ValueError(f"model.checkpoint: {e}") from None
    validate_layout(cfg, cfg.world_size, arch)
    if command == "generate" and model_node:  # the batch job's driver runs on node 0
        from megatron_lamina.batch.batch_output import OutputError, check_output

        if not Path(args.input).is_file():
            raise ValueError(f"--input {args.input}: no such file")
        try:
            check_output(args.output, args.input, args.resume, args.overwrite)
        except OutputError as e:
            raise ValueError(str(e)) from None
    elif model_node:  # the HTTP server runs on node 0
        from megatron_lamina.server.frontend import listen_socket

        listen_socket(cfg.server.host, cfg.server.port).close()
    return cfg


if __name__ == "__main__":
    sys.exit(main())
