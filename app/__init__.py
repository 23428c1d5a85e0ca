"""The application layer: what the entry scripts and benchmarks wire from Hydra configs.

`picard_sampler` (samplers), `policy` (networks, checkpoints, chunking, training stages) and
`envs` (environments, rollouts, real-time control) know nothing of each other beyond
`policy -> picard_sampler`; this package is where they meet: config checks and one-line errors
(`app.config`), evaluation runs (`app.evaluation`), training runs (`app.training`) and reports
(`app.report`). Entry scripts (`eval_policy.py`, `train_pcm.py`) are thin Hydra wrappers over
it; nothing here imports an entry script (docs/design.md §2).
"""
