"""The data layer: one reader of local data files (:mod:`qru.data.records`), the one QA template
(:mod:`qru.data.qa`) used by training and evaluation, and the synthetic demo corpus."""
from qru.data.qa import QA_PROMPT, QA_TEMPLATE, format_qa, qa_prompt
from qru.data.records import DataError, read_records, read_texts, record_text

__all__ = ["QA_PROMPT", "QA_TEMPLATE", "DataError", "format_qa", "qa_prompt", "read_records", "read_texts",
           "record_text"]
