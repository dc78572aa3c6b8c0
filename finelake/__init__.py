"""finelake: FineInstructions on Spark + Delta Lake.

Import layout: ``finelake.config``, ``finelake.tables``, ``finelake.lake``, ``finelake.spark``
(core); ``finelake.method`` (pure logic of the method, no Spark); ``finelake.models`` (model
backends); ``finelake.udfs`` (Spark glue); ``finelake.jobs`` (one module per stage).
"""

__version__ = "0.1.0"
