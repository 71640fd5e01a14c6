"""What a refiner is judged by: label drift, realism, the downstream gaze estimators and the objective."""
