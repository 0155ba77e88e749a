"""What operators run and hear: the command line, the pipeline's events, its automations, a temporary
Prefect server for one process."""
