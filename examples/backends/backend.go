// A tether backend in Go (standard library only): prints presence changes, answers each
// client message, and resumes the event stream where it stopped after a restart.
//
//	TETHER_API=http://127.0.0.1:7301 TETHER_STATE=last-event-id go run backend.go
//	(TETHER_TOKEN: the server's --http-token-file token, when it has one)
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

var api, state, token = env("TETHER_API", "http://127.0.0.1:7301"), env("TETHER_STATE", "last-event-id"), os.Getenv("TETHER_TOKEN")

type event struct {
	ID          uint64
	Type        string
	ClientID    string `json:"client_id"`
	State       string
	Text        string
	Base64      *string
	Reason      *string
	SilentForMs *uint64 `json:"silent_for_ms"`
	From, To    uint64
}

func env(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func call(method, path string, body []byte, hdr map[string]string) (*http.Response, error) {
	req, _ := http.NewRequest(method, api+path, bytes.NewReader(body))
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return http.DefaultClient.Do(req)
}

func answer(id, text string) {
	body, _ := json.Marshal(map[string]string{"text": text})
	resp, err := call("POST", "/api/clients/"+url.PathEscape(id)+"/messages", body, map[string]string{"Content-Type": "application/json"})
	if err == nil && resp.StatusCode != http.StatusAccepted { // 404 unknown, 409 offline, 429 backlog
		var e struct{ Error string }
		json.NewDecoder(resp.Body).Decode(&e)
		fmt.Printf("cannot answer %s: %s\n", id, e.Error)
	}
	if err == nil {
		resp.Body.Close()
	}
}

func handle(ev event) {
	switch ev.Type {
	case "presence":
		if ev.Reason != nil {
			fmt.Printf("%s %s (%s, silent %d ms)\n", ev.ClientID, ev.State, *ev.Reason, *ev.SilentForMs)
		} else {
			fmt.Printf("%s %s\n", ev.ClientID, ev.State)
		}
	case "message":
		if ev.Base64 != nil {
			ev.Text = fmt.Sprintf("<%d base64 chars>", len(*ev.Base64))
		}
		answer(ev.ClientID, "echo: "+ev.Text)
	case "gap":
		fmt.Printf("missed events %d..%d\n", ev.From, ev.To)
	}
}

func main() {
	last, _ := os.ReadFile(state)
	last = bytes.TrimSpace(last)
	if len(last) > 0 {
		fmt.Println("resuming after event", string(last))
	}
	for ; ; time.Sleep(time.Second) {
		resp, err := call("GET", "/api/events", nil, map[string]string{"Accept": "application/x-ndjson", "Last-Event-ID": string(last)})
		if err != nil {
			fmt.Fprintln(os.Stderr, "event stream:", err)
			continue
		}
		lines := bufio.NewScanner(resp.Body)
		lines.Buffer(make([]byte, 1<<20), 4<<20) // a message event holds up to a frame (1 MiB)
		for lines.Scan() {
			var ev event
			if json.Unmarshal(lines.Bytes(), &ev) != nil {
				continue // keep-alive (a blank line)
			}
			handle(ev)
			last = []byte(strconv.FormatUint(ev.ID, 10)) // handled: remember it
			os.WriteFile(state+".tmp", last, 0o600)
			os.Rename(state+".tmp", state)
		}
		resp.Body.Close()
		fmt.Fprintln(os.Stderr, "event stream ended; reconnecting")
	}
}
