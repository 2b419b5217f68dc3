"""JSON Schemas shipped with medaudit (``results.schema.json``)."""
