"""Lightning DataModules for calibration and recovery text (they arrive with the Lightning layer)."""
