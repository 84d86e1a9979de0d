"""Background runs: executed by a `RunExecutor`, started by a `Dispatcher`, controlled through `BackgroundRuns`.

The executor runs one run at a time per task and knows nothing of queues; a
dispatcher (embedded or Redis) decides when and where a run starts and talks back
to the executor only through the `RunHost` protocol; `lifecycle` ends runs that no
task executes. `deployment.py` wires them together.
"""
