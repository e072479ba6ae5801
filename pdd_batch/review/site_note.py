"""The one-line warning of the summary and the report when a model's threshold was not set on
this site's data (its manifest entry's ``threshold_source`` is not "site").

A threshold set on a development set flags a different share of this site's normal studies
(scanner, protocol, population); `pdd-batch calibrate ARCHIVE --archive` sets it on the site's
own normal studies. Run folders written before the source was recorded give no warning: their
manifests cannot say.
"""

from __future__ import annotations

import html
from typing import Any

SITE = "site"
ADVICE = (
    "calibrate on this site's normal studies: pdd-batch calibrate ARCHIVE --archive --model CKPT"
)


def models_not_site_calibrated(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(model id, threshold source) of each model that screened series in this run and whose
    threshold was not set on site data."""
    out = []
    for m in manifest.get("models") or []:
        if not isinstance(m, dict) or m.get("threshold_source") in (None, SITE):
            continue
        if m.get("series_routed", 1):
            out.append((str(m.get("model_id", "-")), str(m["threshold_source"])))
    return out


def threshold_warning(manifest: dict[str, Any]) -> str | None:
    """The warning line, or None when every model's threshold was set on site data."""
    models = models_not_site_calibrated(manifest)
    if not models:
        return None
    named = ", ".join(f"{mid} ({source})" for mid, source in models)
    return f"threshold not set on this site's data for {named}; {ADVICE}"


def threshold_warning_html(manifest: dict[str, Any]) -> str:
    """The report's block: one warning paragraph, or nothing."""
    text = threshold_warning(manifest)
    return "" if text is None else f'<p class="bad" id="site-calibration">{html.escape(text)}</p>'
