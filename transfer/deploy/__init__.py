"""Using a trained model: load a checkpoint or an exported file, predict, evaluate, export, serve."""
