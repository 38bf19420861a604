"""The self-contained HTML report of a ladder run (``report.html``): tables, plots and thumbnails in one file.

``render_report(doc, path)`` writes it; the document's schema is in ``encoderlab.report.html``.
"""

from .html import SECTIONS, UNREADABLE_HEADING, check_document, render_report, report_html, report_images

__all__ = ["SECTIONS", "UNREADABLE_HEADING", "check_document", "render_report", "report_html", "report_images"]
