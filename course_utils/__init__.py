"""Companion package for the Mistral Small fine-tuning & self-hosting course.

One module per concern (see DESIGN): ``profiles`` (models and hardware tiers), ``hardware``
(detection and preflight), ``tiny`` (offline stand-ins), ``models`` (loading), ``chat``
(prompting and generation), ``cli`` (``python -m course_utils``).
"""

__version__ = "0.1.0"
