"""The compile driver: the `cstar compile` loop (``pipeline``) and its run folder checks (``runfolder``)."""
