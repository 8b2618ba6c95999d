"""Driver for test_param_alignment.py (one process, its own process group): builds the demo
objective with compiled blocks under DeepSpeed's bf16 ZeRO-1, 2 or 3 through the engine's own
builders, with our fragment as it is or with ``parameter_alignment`` taken out of it, and
prints, as JSON, what the engine made of it."""

import json
import sys

from itpn.engine.build import apply_block_options, build_objective
from itpn.engine.config import ConfigError, deepspeed_config, load_config
from itpn.engine.param_groups import param_groups
from itpn.engine.runner import _engine, _optimizer, init_distributed, zero3_misaligned_compiled_parameters
from itpn.layers.block import misaligned_compiled_parameters

zero, variant = sys.argv[1], sys.argv[2]
_, world, _, device = init_distributed()
cfg = load_config("demo", [f"deepspeed.fragments=[{zero}, bf16]"])
objective = build_objective(cfg)
apply_block_options(objective, 1, False, True, {"backend": "aot_eager"})
ds_cfg = deepspeed_config(cfg, world)
if variant == "unaligned":
    del ds_cfg["zero_optimization"]["parameter_alignment"]
opt = _optimizer(param_groups(objective, 0.05), cfg, device, ds_cfg)
try:
    engine = _engine(objective, cfg, ds_cfg, opt)
except ConfigError as e:
    find = zero3_misaligned_compiled_parameters if zero == "zero3" else misaligned_compiled_parameters
    print(json.dumps({"error": str(e), "misaligned": find(objective)}))
else:
    print(json.dumps({"stage": engine.zero_optimization_stage(),
                      "misaligned": misaligned_compiled_parameters(engine.module)}))
