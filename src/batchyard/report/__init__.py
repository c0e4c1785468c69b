"""The run report: one self-contained HTML page per run (`batchyard report RUN`).

`data.py` derives the figures from what the run staged (pure), `plots.py` draws them as inline
SVG with matplotlib, `page.py` reads the run and renders `templates/report.html.j2` with Jinja2.
"""

from batchyard.report.page import QUEUE_FILE, REPORT_FILE, Written, build, write

__all__ = ["QUEUE_FILE", "REPORT_FILE", "Written", "build", "write"]
