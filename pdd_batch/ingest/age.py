"""A patient's age in completed years, from DICOM header values, for scope matching only.

The age is worked out in memory while headers are read and kept as whole years (a 5-year-11-month
child is 5): it is never written to an output, a log or a message. Sources, in order:

1. PatientAge (AS value ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``; e.g. ``005Y``, ``030M``);
2. PatientBirthDate and StudyDate (``YYYYMMDD``): completed years between them.

Anything malformed (a bad unit, a date that does not exist, a birth after the study, an age over
``MAX_AGE_YEARS``) is unknown (None), never a guess.
"""

from __future__ import annotations

import re
from datetime import date

MAX_AGE_YEARS = 150
_AGE_STRING = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}


def age_from_age_string(text: str) -> int | None:
    """Completed years of a PatientAge value (``005Y`` -> 5, ``030M`` -> 2, ``010D`` -> 0)."""
    match = _AGE_STRING.match((text or "").strip().upper())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    years = value if unit == "Y" else int(value * _DAYS_PER[unit] // _DAYS_PER["Y"])
    return years if 0 <= years <= MAX_AGE_YEARS else None


def _date(text: str) -> date | None:
    text = (text or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_from_dates(birth_date: str, study_date: str) -> int | None:
    """Completed years between PatientBirthDate and StudyDate (both ``YYYYMMDD``)."""
    born, seen = _date(birth_date), _date(study_date)
    if born is None or seen is None or seen < born:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if years <= MAX_AGE_YEARS else None


def age_years(patient_age: str, birth_date: str, study_date: str) -> int | None:
    """The patient's age in completed years at the study, or None when the header cannot say."""
    from_age = age_from_age_string(patient_age)
    return from_age if from_age is not None else age_from_dates(birth_date, study_date)
