module roma-byob/udfs/go

go 1.18
