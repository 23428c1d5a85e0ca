"""The application layer: what the entry scripts and benchmarks wire from Hydra configs.

`picard_sampler` (samplers), `policy` (networks, checkpoints, chunking, training stages) and
`envs` (environments, rollouts, real-time control) know nothing of each other beyond
`policy -> picard_sampler`; this package is where they meet: config value checks
(`app.checks`), the device (`app.device`), the command line before Hydra (`app.command_line`),
one-line errors and exit statuses (`app.entry`), run folders (`app.run_dirs`), the policy
builder eval and serve share (`app.builder`), evaluation runs (`app.evaluation`), training runs
(`app.training`), reports (`app.report`) and the policy server (`app.serving`). Entry scripts
(`eval_policy.py`, `train_pcm.py`, `serve_policy.py`) are thin Hydra wrappers over it; nothing
here imports an entry script (docs/design.md §2).
"""
