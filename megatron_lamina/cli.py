"""`lamina`: one command per job; the ranks are counted from the config, never by hand.

    lamina serve --config configs/default.yaml [--set KEY=VALUE ...]
    lamina generate --config CFG --input IN.jsonl --output OUT.jsonl [--resume] [--quiet]
    lamina convert --source gguf --input model.gguf --output checkpoints/model

`serve` and `generate` first check, in this process, everything that can be checked before a
rank starts: the config, its layout against the checkpoint's architecture, the input file,
the output's lock, the server's port. A mistake is one `error:` line and exit status 2.
Then they start parallel.tensor_parallel + parallel.attention_workers ranks of the rank
program (megatron_lamina/launch/serve.py, generate.py) through torch's launcher API
(`launch/ranks.py`) and exit with the job's status. `convert` runs the checkpoint converter.
`lamina COMMAND --help` lists a command's options. The torchrun commands
(`torchrun --nproc-per-node N launcher/serve.py ...`) run the same rank programs.
"""

from __future__ import annotations

import sys
from pathlib import Path

COMMANDS = {
    "serve": "OpenAI-compatible HTTP server (rank 0 serves server.host:server.port)",
    "generate": "offline batch generation, JSONL in, JSONL out",
    "convert": "convert a Hugging Face, GGUF, Megatron or DeepSpeed checkpoint into a canonical one",
}


def usage() -> str:
    lines = ["usage: lamina COMMAND [options]   (lamina COMMAND --help lists a command's options)", "", "commands:"]
    return "\n".join(lines + [f"  {name:<10}{what}" for name, what in COMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "convert":
        from megatron_lamina.launch.convert import main as convert

        return convert(rest, prog="lamina convert")
    if command == "serve":
        from megatron_lamina.launch.serve import build_parser
    else:
        from megatron_lamina.launch.generate import build_parser
    args = build_parser(prog=f"lamina {command}").parse_args(rest)
    try:
        cfg = check_job(command, args)
    except (ValueError, OSError) as e:  # ConfigError, a checkpoint or file that is not there, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_lamina.launch.ranks import start_ranks

    par = cfg.parallel
    print(f"lamina: starting {cfg.world_size} ranks ({par.tensor_parallel} model worker(s), "
          f"{par.attention_workers} attention worker(s))", file=sys.stderr, flush=True)
    grace = cfg.server.drain_timeout_s + 10 if command == "serve" else 30.0
    return start_ranks(cfg.world_size, command, rest, shutdown_timeout_s=grace)


def check_job(command: str, args):
    """The config of a serve / generate job, checked as far as it can be without the ranks."""
    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.errors import open_safetensors
    from megatron_lamina.checkpoint.writer import MODEL_FILE
    from megatron_lamina.config import config_from_args, validate_layout

    cfg = config_from_args(args)
    try:
        arch = read_architecture(cfg.model.checkpoint)
        open_safetensors(Path(cfg.model.checkpoint) / MODEL_FILE)  # reads the header: truncated, corrupt?
    except (OSError, ValueError) as e:  # CheckpointInputError is a ValueError
        raise ValueError(f"model.checkpoint: {e}") from None
    validate_layout(cfg, cfg.world_size, arch)
    if command == "generate":
        from megatron_lamina.engine.batch_output import OutputError, check_output_free

        if not Path(args.input).is_file():
            raise ValueError(f"--input {args.input}: no such file")
        try:
            check_output_free(args.output)
        except OutputError as e:
            raise ValueError(str(e)) from None
    else:
        from megatron_lamina.server.frontend import listen_socket

        listen_socket(cfg.server.host, cfg.server.port).close()
    return cfg


if __name__ == "__main__":
    sys.exit(main())
