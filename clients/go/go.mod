module example.invalid/tether/clients/go

go 1.19
