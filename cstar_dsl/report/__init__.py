"""The report: the compile report as Markdown (``markdown``) and its plots (``plots``), from the typed run report
(``cstar_dsl.run_report``) and the formats of its values (``values``); ``document`` is what the compile
driver imports."""
