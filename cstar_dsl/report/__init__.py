"""The report: the compile report as Markdown and its plots (``document``)."""
