"""Point-to-point exchange of attention inputs and outputs between the two roles."""
