"""The report: the compile report as Markdown (``markdown``) and its plots (``plots``), from lenient readers of
its values (``values``); ``document`` is what the compile driver imports."""
