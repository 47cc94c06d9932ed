"""rlx's recipes, one `get_config()` file each; installed as `rlx.configs`.

Use one by file (`--config=configs/grpo.py`, from a clone) or by name
(`--config=grpo`, wherever rlx is installed), or import it
(`from rlx.configs import grpo; config = grpo.get_config()`).
"""
