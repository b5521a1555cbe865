"""What the launchers run: the rank programs (`serve`, `generate`), the converter's command
line (`convert`), and how ranks are started and tied to their launcher (`ranks`).

`lamina` (megatron_lamina/cli.py) and the scripts in launcher/ and tools/ are thin doors
into these modules.
"""
