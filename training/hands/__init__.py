"""Training the hand generator (Giving a Hand to Diffusion Models): dataset and trainer."""
