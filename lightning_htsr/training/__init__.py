"""Live training: :class:`~lightning_htsr.training.callback.HTSRCallback` and what only it uses.

``callback`` (the thin Lightning shell: schedule, state, hooks), ``live`` (one analysis of the model in training:
this rank's share, reuse, gathering), ``schedule`` (when to analyze), ``stopping`` (the stop rules and their replay),
``monitor`` (reading a monitored validation metric), ``best_weights`` (the kept copy of the best analysis' weights),
``reuse`` (results of unchanged weights), ``sinks`` (TensorBoard, any logger, the history file, the summary). Imports
the pipeline below it, never the command line.
"""
