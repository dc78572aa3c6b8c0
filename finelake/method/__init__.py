"""Pure logic of the FineInstructions method: no Spark, no models. Tested on its own."""
