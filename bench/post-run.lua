-- wrk script of scripts/bench-http.sh, the same for every server: each request is genpipe's
-- `POST /v1/runs` of the `noop` pipeline, waiting for the run to end (`Prefer: wait=10`).
-- Every response must be a 200 whose body contains the text given after `--` on wrk's command
-- line (`"status":"completed"` for genpipe); done() prints how many were not, as
-- "unexpected responses: N", which the script checks.

wrk.method = "POST"
wrk.path = "/v1/runs"
wrk.body = '{"pipeline":"noop","input":{"prompt":"hello"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key"
wrk.headers["Prefer"] = "wait=10"

local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    expected = args[1] or ""
    unexpected = 0
    first_unexpected = ""
end

function response(status, headers, body)
    if status ~= 200 or not string.find(body, expected, 1, true) then
        if unexpected == 0 then
            first_unexpected = status .. " " .. string.sub(body, 1, 300)
        end
        unexpected = unexpected + 1
    end
end

function done(summary, latency, requests)
    local count, example = 0, ""
    for _, thread in ipairs(threads) do
        local n = thread:get("unexpected")
        if n > 0 and example == "" then
            example = thread:get("first_unexpected")
        end
        count = count + n
    end
    io.write(string.format("unexpected responses: %d\n", count))
    if count > 0 then
        io.write("first unexpected response: " .. example .. "\n")
    end
end
